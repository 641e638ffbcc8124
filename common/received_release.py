"""The global model as the sites receive it: signed by the coordinator, checked by each site.

Why: in a run the global model reaches a site as weight arrays in the finalize message, not
as a file with a ``.release.json`` beside it — and the SuperLink that relays the message sees
and could change it (TLS ends there). So the coordinator signs, right after it converts the
global model, a release whose manifest also binds the exact arrays it sends
(``weights_sha256``, :func:`arrays_sha256`) and the Akida model they convert to
(``akida_hash``), and sends that signed document with them. A site that holds its
coordinator's release public key (its kit's ``release.pub``) checks, with the one signature
check of :mod:`common.release`, that the document is signed by that key for this run and
round and names the arrays it received (before it converts them), then that its own
conversion gives the signed Akida hash (before it evaluates or learns on-chip).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SecurityError
from .log import get_logger
from .release import sign_release, verify_document

__all__ = ["arrays_sha256", "check_akida_hash", "sign_for_sites", "verify_received"]

_log = get_logger("site.release")

_warned: set[str] = set()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Return the SHA-256 of named arrays: per name (sorted), its name, dtype, shape and bytes.

    The same arrays give the same digest in any process and in any key order; a changed value,
    dtype, shape, name, or an array added or removed gives another.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        header = json.dumps([name, value.dtype.str, list(value.shape)]).encode("utf-8")
        digest.update(len(header).to_bytes(8, "big") + header)
        digest.update(value.nbytes.to_bytes(8, "big") + value.tobytes())
    return digest.hexdigest()


def _refused(site_id: str, step: int, what: str, fix: str) -> SecurityError:
    return SecurityError(
        f"site {site_id} refuses the global model of round {step}: {what}; the model is not "
        "used (no evaluation, no on-chip learning)", fix)


_ASK = ("ask the coordinator to publish a release signed by the key of this site's kit "
        "(coordinator kit release.key, `release-private-key`), and check that the site's "
        "release.pub is the one of that federation")


def verify_received(
    release: str | None,
    public_key: str | Path | None,
    arrays: Mapping[str, np.ndarray],
    *,
    site_id: str,
    run_id: str,
    step: int,
) -> dict[str, Any] | None:
    """Check the signed release sent with the global arrays; return its manifest.

    Parameters
    ----------
    release : str | None
        The release document (JSON) from the finalize message; None or "" when unsigned.
    public_key : str | Path | None
        The site's trusted release public key (node config ``release-public-key``). None: the
        model is not checked (a warning, once per process).
    arrays : Mapping[str, np.ndarray]
        The global arrays exactly as received.
    site_id, run_id, step : str, str, int
        This site, and the run and round of the message.

    Returns
    -------
    dict[str, Any] | None
        The verified manifest; None when the site has no key.

    Raises
    ------
    SecurityError
        Unsigned, not signed by the trusted key (or by a revoked one), altered after signing,
        for another run or round, or naming other weights than those received.
    """
    if not public_key:
        if site_id not in _warned:
            _warned.add(site_id)
            _log.warning("site %s has no release-public-key: the global model is used without "
                         "checking who released it (give the node config the kit's release.pub)",
                         site_id)
        return None
    if not release:
        raise _refused(site_id, step, "it is unsigned (the finalize message carries no release)",
                       _ASK)
    where = f"the release sent with round {step} of run {run_id}"
    try:
        document = json.loads(release)
    except json.JSONDecodeError as err:
        raise _refused(site_id, step, f"{where} is not JSON ({err})", _ASK) from None
    try:
        manifest = verify_document(document, public_key, where)
    except SecurityError as err:
        raise _refused(site_id, step, err.problem, _ASK) from None
    if manifest.get("run_id") != run_id or manifest.get("round") != step:
        raise _refused(
            site_id, step, f"its release is signed for run {manifest.get('run_id')} round "
            f"{manifest.get('round')}, not this run's round (a replayed release)", _ASK)
    received = arrays_sha256(arrays)
    signed = manifest.get("weights_sha256")
    if received != signed:
        raise _refused(
            site_id, step, f"the weights received (SHA-256 {received[:16]}…) are not the "
            f"signed ones ({str(signed)[:16]}…): changed on the way", _ASK)
    _log.info("site %s: global model of round %d verified (release key %s)", site_id, step,
              manifest.get("key_id"))
    return manifest


def check_akida_hash(manifest: Mapping[str, Any] | None, digest: str | None, *,
                     site_id: str, step: int) -> None:
    """Refuse an Akida model whose hash is not the signed ``akida_hash`` (no-op without one).

    Raises
    ------
    SecurityError
        The site's conversion of the verified weights is another Akida model than the one the
        coordinator released.
    """
    if manifest is None:
        return
    if digest != manifest.get("akida_hash"):
        raise _refused(
            site_id, step, f"its Akida conversion {str(digest)[:16]}… is not the released "
            f"model {str(manifest.get('akida_hash'))[:16]}…",
            "run the site with the coordinator's qanafed and library versions (conversion "
            "must give identical bits), then rerun")


def sign_for_sites(
    model: str | Path, private_key: str | Path, arrays: Mapping[str, np.ndarray], **fields: Any
) -> str:
    """Sign the global model as it is sent to the sites; return the release document (JSON).

    The manifest (written beside ``model`` as ``<model>.release.json`` too) binds the model
    file, the arrays sent (``weights_sha256``) and ``fields`` (``run_id``, ``round``,
    ``akida_hash``, ...); the sites check it with :func:`verify_received`.
    """
    path = sign_release(model, private_key, weights_sha256=arrays_sha256(arrays), **fields)
    return json.dumps(json.loads(path.read_text(encoding="utf-8")), separators=(",", ":"),
                      ensure_ascii=False)
