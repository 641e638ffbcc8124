"""Signed global-model releases: an Ed25519-signed manifest beside every published model.

Why: TLS and SuperNode keys tell a site *who it talks to*, not *which model it is about to run*.
A hospital must be able to check, from its own side and offline, that the model file on its disk
is the one its coordinator released — byte for byte — before it loads it, converts it or lets the
chip learn from it. So the coordinator signs a small manifest (model SHA-256, run, round,
variant, classes, preprocessing, metrics summary, time, key id) and writes it beside the model
as ``<model>.release.json``; a site verifies it with the coordinator's *public* release key from
its kit.

Format (``"format": "qanafed-release/1"``)::

    {"format": ..., "manifest": {...}, "signature": b64(Ed25519(canonical(manifest))),
     "signer": {"key_id": ..., "public_key": b64(raw 32 bytes)}, "key_chain": [link, ...]}

``canonical`` is JSON with sorted keys, no spaces, UTF-8, no NaN. Only ``cryptography``'s
Ed25519 and SHA-256 are used; nothing here is home-made cryptography.

Key rotation: the coordinator makes a new key and signs a *link*
``{"key_id", "public_key", "previous", "created"}`` with the old one (:func:`rotate_release_key`).
A site keeps trusting the first key (its kit's ``release.pub``, the root); a release signed by a
later key carries the links from the root to it, and verification walks them. Revocation: key
ids in ``release-revoked.json`` beside the trusted public key (shipped with the kits) are never
accepted — not as signer, not as a link of the chain.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import atomic_write_text
from common.errors import SecurityError
from common.keyfiles import read_private, read_public, write_private, write_public
from common.log import get_logger
from common.model_meta import read_meta

__all__ = [
    "CHAIN_FILE",
    "FORMAT",
    "RELEASE_SUFFIX",
    "REVOKED_FILE",
    "canonical_json",
    "check_before_use",
    "default_public_key",
    "file_sha256",
    "generate_release_keypair",
    "load_release_private_key",
    "load_release_public_key",
    "read_chain",
    "read_revoked",
    "release_key_id",
    "release_key_ids",
    "release_document",
    "release_path",
    "revoke_release_key",
    "root_public_pem",
    "rotate_release_key",
    "sign_release",
    "verify_document",
    "verify_release",
]

FORMAT = "qanafed-release/1"
#: ``model.fbz`` → ``model.fbz.release.json``.
RELEASE_SUFFIX = ".release.json"
#: Beside the release key: the rotation links from the root key to the current one.
CHAIN_FILE = "release-chain.json"
#: Beside the trusted public key: key ids that must never be accepted again.
REVOKED_FILE = "release-revoked.json"

_log = get_logger("release")


# ------------------------------------------------------------------------------------ helpers


def canonical_json(value: Any) -> bytes:
    """Return the signed bytes of ``value``: JSON, sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _finite(value: Any) -> Any:
    """Plain JSON of ``value`` with NaN/inf as None (a metric that is not defined)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, where: Path) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise SecurityError(f"{where}: {what} is not base64", _RESTORE) from None


_RESTORE = "restore the file from the coordinator's release (copy model and manifest again)"


def file_sha256(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_path(model: str | Path) -> Path:
    """Return the manifest file of ``model`` (``<model>.release.json``)."""
    model = Path(model)
    return model.with_name(model.name + RELEASE_SUFFIX)


# --------------------------------------------------------------------------------------- keys


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def release_key_id(public: Ed25519PublicKey) -> str:
    """Return the id of a release public key: SHA-256 of its raw 32 bytes, first 8, as hex."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def generate_release_keypair(private: str | Path, public: str | Path) -> str:
    """Make an Ed25519 release key: ``private`` (PKCS#8 PEM, 0600), ``public`` (PEM, 0644).

    Returns
    -------
    str
        The key id. An existing file is never overwritten (:class:`SecurityError`).
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(private, pem)
    write_public(public, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return release_key_id(key.public_key())


def load_release_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load the coordinator's release private key (0600 PEM); errors name the file."""
    data = read_private(path, how_to_create="run `qanafed provision` (coordinator kit) or "
                        "`qanafed sim` (run keys folder) to make it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SecurityError(f"{path} is not a PEM private key ({err})",
                            "point to the release.key written by qanafed") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, not an Ed25519 release key",
                            "point to the release.key written by qanafed") from None
    return key


def load_release_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a release public key (PEM); errors name the file."""
    data = read_public(path, how_to_create="take release.pub from the site or coordinator kit")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SecurityError(f"{path} is not a PEM public key ({err})",
                            "pass the release.pub of a qanafed kit or run keys folder") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, not an Ed25519 release key",
                            "pass the release.pub of a qanafed kit or run keys folder")
    return key


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SecurityError(f"{path} is not a readable {what} ({err})", _RESTORE) from None


def read_chain(folder: str | Path) -> list[dict[str, Any]]:
    """Return the rotation links kept in ``folder/release-chain.json`` (empty if none)."""
    path = Path(folder) / CHAIN_FILE
    if not path.is_file():
        return []
    data = _read_json(path, "release key chain")
    links = data.get("links") if isinstance(data, dict) else None
    if not isinstance(links, list):
        raise SecurityError(f"{path} has no list of 'links'", _RESTORE)
    return links


def read_revoked(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Return ``key id → revocation record`` from ``folder/release-revoked.json`` ({} if none)."""
    path = Path(folder) / REVOKED_FILE
    if not path.is_file():
        return {}
    data = _read_json(path, "release key revocation list")
    entries = data.get("revoked") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "key-id" in e
                                                for e in entries):
        raise SecurityError(f"{path} has no list of 'revoked' entries with a 'key-id'", _RESTORE)
    return {str(e["key-id"]): e for e in entries}


def root_public_pem(folder: str | Path) -> bytes:
    """Return the PEM of the root release key of ``folder`` (what every site kit trusts).

    That is the first key: the chain's root after a rotation, else ``folder/release.pub``.
    """
    folder = Path(folder)
    if not (folder / CHAIN_FILE).is_file():
        return read_public(folder / "release.pub")
    root = _read_json(folder / CHAIN_FILE, "release key chain").get("root") or {}
    key = _public_from(_unb64(root.get("public_key"), "root key", folder / CHAIN_FILE),
                       folder / CHAIN_FILE)
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def release_key_ids(folder: str | Path) -> list[str]:
    """Return the ids of every release key of ``folder``: the root first, then each rotation."""
    root = serialization.load_pem_public_key(root_public_pem(folder))
    return [release_key_id(root), *(str(link.get("key_id")) for link in read_chain(folder))]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rotate_release_key(folder: str | Path) -> tuple[str, str]:
    """Replace ``folder/release.key`` by a new key whose public key the old one signs.

    The link (new key, previous key id, time, signature by the old key) is appended to
    ``folder/release-chain.json``; the old private key moves to ``folder/retired/`` (0600; it
    signs nothing any more — destroy it once every site verified a release of the new key).

    Returns
    -------
    tuple[str, str]
        ``(old key id, new key id)``.
    """
    folder = Path(folder)
    private, public = folder / "release.key", folder / "release.pub"
    old = load_release_private_key(private)
    old_id = release_key_id(old.public_key())
    new = Ed25519PrivateKey.generate()
    link = {"key_id": release_key_id(new.public_key()), "public_key": _b64(_raw(new.public_key())),
            "previous": old_id, "created": _now()}
    link["signature"] = _b64(old.sign(canonical_json(link)))
    chain_file = folder / CHAIN_FILE
    root = (_read_json(chain_file, "release key chain").get("root") if chain_file.is_file()
            else {"key_id": old_id, "public_key": _b64(_raw(old.public_key()))})
    # Order: the old key kept, then the link, then the new key: a crash in between leaves the
    # old key working (a link to a key never used is harmless).
    write_private(folder / "retired" / f"release-{old_id}.key", read_private(private),
                  overwrite=True)
    atomic_write_text(chain_file, json.dumps({"root": root, "links": [*read_chain(folder), link]},
                                             indent=2) + "\n")
    write_private(private, new.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), overwrite=True)
    write_public(public, new.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        overwrite=True)
    _log.info("release key rotated in %s: %s -> %s", folder, old_id, link["key_id"])
    return old_id, link["key_id"]


def revoke_release_key(folder: str | Path, key_id: str, reason: str = "") -> Path:
    """Add ``key_id`` to ``folder/release-revoked.json`` (once); return that file."""
    folder = Path(folder)
    revoked = read_revoked(folder)
    revoked.setdefault(key_id, {"key-id": key_id, "revoked-at": _now(), "reason": reason})
    path = folder / REVOKED_FILE
    atomic_write_text(path, json.dumps({"revoked": list(revoked.values())}, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------- sign


def release_document(model: str | Path, private_key: str | Path, **fields: Any) -> dict[str, Any]:
    """Return the signed release document of ``model`` (what :func:`sign_release` writes).

    Parameters and manifest fields as in :func:`sign_release`; nothing is written.
    """
    model = Path(model)
    key = load_release_private_key(private_key)
    if not model.is_file():
        raise SecurityError(f"cannot sign {model}: no such file",
                            "sign the model file the run wrote")
    meta = read_meta(model) or {}
    manifest = {
        "model": {"file": model.name, "sha256": file_sha256(model),
                  "bytes": model.stat().st_size},
        "run_id": None, "round": None, "variant": meta.get("variant"),
        "classes": meta.get("class_names"), "preprocessing": meta.get("preprocessing"),
        "metrics": None,
        **_finite(fields),
        "created": _now(),
        "key_id": release_key_id(key.public_key()),
    }
    if meta.get("akida_hash"):
        manifest.setdefault("akida_hash", meta["akida_hash"])
    return {
        "format": FORMAT,
        "manifest": manifest,
        "signature": _b64(key.sign(canonical_json(manifest))),
        "signer": {"key_id": manifest["key_id"], "public_key": _b64(_raw(key.public_key()))},
        "key_chain": read_chain(Path(private_key).parent),
    }


def sign_release(model: str | Path, private_key: str | Path, **fields: Any) -> Path:
    """Sign a published model: write ``<model>.release.json`` beside it, atomically.

    Parameters
    ----------
    model : str | Path
        The model file (e.g. ``global_model.fbz``).
    private_key : str | Path
        The coordinator's ``release.key`` (0600). A ``release-chain.json`` beside it (after a
        rotation) is embedded so that sites trusting an older key can follow it.
    **fields : Any
        Manifest fields: ``run_id``, ``round``, ``variant``, ``classes``, ``metrics`` (a
        summary) and anything else worth signing. ``preprocessing`` and ``classes`` default to
        what the model's ``.meta.json`` records.

    Returns
    -------
    Path
        The manifest file.
    """
    document = release_document(model, private_key, **fields)
    manifest = document["manifest"]
    path = release_path(model)
    atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    _log.info("signed release %s (model sha256 %s, key %s)", path,
              manifest["model"]["sha256"][:16], manifest["key_id"])
    return path


# ------------------------------------------------------------------------------------- verify


def _public_from(raw: bytes, where: Path) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SecurityError(f"{where}: a public key is not 32 raw Ed25519 bytes",
                            _RESTORE) from None


def _signed(key: Ed25519PublicKey, signature: Any, value: Any, where: Path) -> bool:
    """Whether ``signature`` (base64) is ``key``'s Ed25519 signature of ``canonical(value)``."""
    try:
        key.verify(_unb64(signature, "a signature", where), canonical_json(value))
    except InvalidSignature:
        return False
    return True


def _revoked_error(key_id: str, role: str, where: Path, source: Path) -> SecurityError:
    return SecurityError(
        f"{where} is {role} release key {key_id}, which is revoked ({source})",
        "do not use this model; ask the coordinator for a release signed by its current key",
    )


def _trusted_signer(
    document: dict[str, Any], root: Ed25519PublicKey, extra_links: Iterable[dict[str, Any]],
    revoked: Mapping[str, Any], where: Path, revoked_file: Path,
) -> Ed25519PublicKey:
    """Walk the rotation links from the trusted ``root`` to the release's signer; return it."""
    signer = document.get("signer")
    if not isinstance(signer, dict):
        raise SecurityError(f"{where} names no signer", _RESTORE)
    signer_key = _public_from(_unb64(signer.get("public_key"), "signer key", where), where)
    signer_id = release_key_id(signer_key)
    current, current_id = root, release_key_id(root)
    if current_id in revoked:
        raise _revoked_error(current_id, "trusting", where, revoked_file)
    if signer_id in revoked:
        raise _revoked_error(signer_id, "signed by", where, revoked_file)
    links = [*list(document.get("key_chain") or []), *extra_links]
    used: set[str] = set()
    while current_id != signer_id:
        step = next((ln for ln in links if isinstance(ln, dict)
                     and ln.get("previous") == current_id and ln.get("key_id") not in used), None)
        if step is None:
            raise SecurityError(
                f"{where} is signed by release key {signer_id}, which is not the trusted key "
                f"{release_key_id(root)} nor reached from it by a signed key rotation",
                "verify with the release.pub of the kit of the federation that made this model "
                "(--key), or ask the coordinator for its key chain (release-chain.json)",
            )
        body = {k: step.get(k) for k in ("key_id", "public_key", "previous", "created")}
        if not _signed(current, step.get("signature"), body, where):
            raise SecurityError(
                f"{where}: the rotation from key {current_id} to {step.get('key_id')} is not "
                f"signed by {current_id} (key chain tampered)", _RESTORE)
        current = _public_from(_unb64(step.get("public_key"), "rotated key", where), where)
        current_id = release_key_id(current)
        if current_id != step.get("key_id"):
            raise SecurityError(f"{where}: a rotation link's key id does not match its key",
                                _RESTORE)
        if current_id in revoked:
            raise _revoked_error(current_id, "chained through", where, revoked_file)
        used.add(current_id)
    return current


def verify_document(
    document: Any, public_key: str | Path, where: str | Path
) -> dict[str, Any]:
    """Check a release document's signature against the trusted key; return its manifest.

    The model it names is not checked here (:func:`verify_release` checks a file's SHA-256;
    a site checks the weights it received, :mod:`common.received_release`).

    Parameters
    ----------
    document : Any
        The parsed ``<model>.release.json`` (or the same document sent in a message).
    public_key : str | Path
        The trusted release public key; ``release-revoked.json`` and ``release-chain.json``
        beside it are honoured.
    where : str | Path
        Names the document in errors (its file, or the message it came in).

    Raises
    ------
    SecurityError
        Not a release document, unknown or revoked signer, broken key chain, bad signature.
    """
    manifest_file = Path(where)
    public_key = Path(public_key)
    root = load_release_public_key(public_key)
    revoked = read_revoked(public_key.parent)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SecurityError(f"{manifest_file} is not a {FORMAT} manifest", _RESTORE)
    manifest = document.get("manifest")
    if not isinstance(manifest, dict):
        raise SecurityError(f"{manifest_file} holds no manifest", _RESTORE)
    signer = _trusted_signer(document, root, read_chain(public_key.parent), revoked,
                             manifest_file, public_key.parent / REVOKED_FILE)
    if not _signed(signer, document.get("signature"), manifest, manifest_file):
        raise SecurityError(
            f"{manifest_file} was altered after it was signed (its signature by key "
            f"{release_key_id(signer)} does not match its content)",
            "do not use this model; copy model and manifest again from the coordinator",
        )
    if manifest.get("key_id") != release_key_id(signer):
        raise SecurityError(f"{manifest_file}: signed key id {manifest.get('key_id')} is not "
                            f"the signer {release_key_id(signer)}", _RESTORE)
    return manifest


def verify_release(model: str | Path, public_key: str | Path | None = None) -> dict[str, Any]:
    """Check a model against its signed manifest; return the manifest.

    Parameters
    ----------
    model : str | Path
        The model file; its manifest is ``<model>.release.json``.
    public_key : str | Path | None (default: None)
        The trusted release public key (a kit's ``release.pub``). ``release-revoked.json`` and
        ``release-chain.json`` beside it are honoured. None: the run's own key, looked up in
        ``<run folder>.keys/release.pub`` (what ``qanafed sim`` writes beside its run folder).

    Returns
    -------
    dict[str, Any]
        The signed manifest (``model``, ``run_id``, ``round``, ``variant``, ``classes``,
        ``preprocessing``, ``metrics``, ``created``, ``key_id``, ...).

    Raises
    ------
    SecurityError
        Naming the file and what failed: missing model or manifest, no key found, model hash
        mismatch, manifest tampered (bad signature), unknown key, revoked key.
    """
    model = Path(model)
    manifest_file = release_path(model)
    if not model.is_file():
        raise SecurityError(f"model file {model} does not exist",
                            "pass the model file whose release you want to check")
    if not manifest_file.is_file():
        raise SecurityError(
            f"{model} has no signed release manifest ({manifest_file.name} is missing): it was "
            "not released by a qanafed coordinator, or the manifest was not copied with it",
            f"copy {manifest_file.name} together with the model from the coordinator; never run "
            "an unsigned model",
        )
    if public_key is None:
        public_key = default_public_key(model)
    manifest = verify_document(_read_json(manifest_file, "release manifest"), public_key,
                               manifest_file)
    expected = (manifest.get("model") or {}).get("sha256")
    actual = file_sha256(model)
    if actual != expected:
        raise SecurityError(
            f"{model} differs from its signed release: SHA-256 {actual[:16]}… but "
            f"{manifest_file.name} signs {str(expected)[:16]}…",
            "the model file was changed or corrupted: copy it again from the coordinator (never "
            "run it as it is)",
        )
    _log.debug("verified release of %s (run %s, round %s, key %s)", model,
              manifest.get("run_id"), manifest.get("round"), manifest.get("key_id"))
    return manifest


def check_before_use(model: str | Path, public_key: str | Path | None) -> dict[str, Any] | None:
    """Verify a model before it is loaded, converted or taught, when it is a release.

    A model is treated as a release when a trusted key is given (a site names its kit's
    ``release.pub``) or when a ``<model>.release.json`` lies beside it; then anything but a
    valid release is refused. A model with neither (one trained locally) passes unchecked.

    Returns
    -------
    dict[str, Any] | None
        The verified manifest, or None for an unreleased model used without a key.
    """
    if public_key is None and not release_path(model).is_file():
        return None
    return verify_release(model, public_key)


def default_public_key(model: str | Path) -> Path:
    """Return the run's own release public key: ``<run folder>.keys/release.pub``.

    Raises
    ------
    SecurityError
        When there is none (name the key with ``--key``).
    """
    run = Path(model).expanduser().resolve().parent
    candidate = run.with_name(f"{run.name}.keys") / "release.pub"
    if candidate.is_file():
        return candidate
    raise SecurityError(
        f"no release public key given for {model}, and none at {candidate} (where `qanafed sim` "
        "keeps a run's key)",
        "pass the trusted key: --key KIT/release.pub (a site's kit) or RUN.keys/release.pub",
    )
