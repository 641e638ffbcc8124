"""End-to-end encrypted metrics reports from sites to the coordinator (X25519 + HKDF + AES-GCM).

TLS ends at the SuperLink, which therefore sees every payload. A site encrypts each metrics report
to the coordinator's X25519 public key so that only the coordinator (holder of the private key) can
read it, and binds it to the run, round and site it was made for.

Envelope format, version 1 (all integers big-endian; everything before the ciphertext is the header
and is authenticated as AES-GCM associated data)::

    offset  size  field
    0       4     magic b"QFMR"
    4       1     version = 1
    5       8     recipient key id: SHA-256(raw coordinator X25519 public key)[:8]
    13      32    ephemeral X25519 public key (raw), fresh per report
    45      12    AES-GCM nonce (random)
    57      1     len(run_id) in UTF-8 bytes (1..255)
    58      n     run_id (UTF-8)
    ..      4     round (unsigned)
    ..      1     len(site_id) in UTF-8 bytes (1..255)
    ..      m     site_id (UTF-8)
    ..      rest  AES-256-GCM ciphertext followed by its 16-byte tag

Key derivation: ``shared = X25519(ephemeral_private, recipient_public)``;
``key = HKDF-SHA256(shared, length=32, salt=ephemeral_public || recipient_public,
info=b"qanafed/metrics-report/v1")``. The salt binds the key to both public keys, the info string to
this protocol and version.

The plaintext is canonical JSON ``{"metrics", "report_id", "round", "run_id", "site_id", "v"}``;
``report_id`` is 16 random bytes (hex) used for replay detection. The run, round and site are in the
clear header (the SuperLink knows them anyway: it routes the message) so a report for the wrong
run/round/site/recipient is told apart from a tampered one, and they are repeated inside the
plaintext.

Metrics may be ``None``, bools, ints, finite floats, strings, lists and dicts with string keys
(numpy scalars and arrays are converted). NaN and infinities are rejected with :class:`DataError`
naming the key: JSON has no NaN, and a NaN metric is almost always a bug (use ``None`` for "not
defined").

Note: anyone holding the coordinator's *public* key can make a report; this scheme gives
confidentiality and integrity, not sender authentication (that comes from SuperNode
authentication on the transport).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import DataError, SecurityError
from common.keyfiles import read_private, read_public, write_private, write_public
from common.log import get_logger

__all__ = [
    "ENVELOPE_VERSION",
    "HKDF_INFO",
    "MAGIC",
    "MAX_ENVELOPE_BYTES",
    "MalformedReport",
    "MisaddressedReport",
    "ReplayedReport",
    "ReportReceiver",
    "TamperedReport",
    "encrypt_report",
    "generate_metrics_keypair",
    "key_id",
    "load_metrics_private_key",
    "load_metrics_public_key",
    "save_metrics_keypair",
]

MAGIC = b"QFMR"
ENVELOPE_VERSION = 1
HKDF_INFO = b"qanafed/metrics-report/v1"
#: Reports larger than this are refused before any work is done (16 MiB).
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024

_KEY_ID_LEN = 8
_PUB_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_FIXED = struct.Struct(f">4sB{_KEY_ID_LEN}s{_PUB_LEN}s{_NONCE_LEN}s")
_MAX_ROUND = 2**32 - 1

_log = get_logger("metrics_crypto")


class TamperedReport(SecurityError):
    """The envelope does not authenticate: header or ciphertext changed, or the wrong key."""


class ReplayedReport(SecurityError):
    """The report was already accepted once."""


class MisaddressedReport(SecurityError):
    """The report is for another recipient key, run, round or site."""


class MalformedReport(SecurityError):
    """The envelope or its payload cannot be parsed (truncated, garbage, unknown version)."""


# ---------------------------------------------------------------------------------------- keys


def generate_metrics_keypair() -> tuple[X25519PrivateKey, X25519PublicKey]:
    """Generate the coordinator's X25519 key pair for metrics reports.

    Returns
    -------
    tuple[X25519PrivateKey, X25519PublicKey]
        The private key and its public key.
    """
    private = X25519PrivateKey.generate()
    return private, private.public_key()


def _describe(key: object) -> str:
    """Name a key's type for error messages, e.g. ``"EC secp384r1 key"``."""
    curve = getattr(key, "curve", None)
    return f"EC {curve.name} key" if curve is not None else type(key).__name__


def _raw_public(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key_id_bytes(public_key: X25519PublicKey) -> bytes:
    return hashlib.sha256(_raw_public(public_key)).digest()[:_KEY_ID_LEN]


def key_id(public_key: X25519PublicKey) -> str:
    """Return the short fingerprint of a metrics public key (16 hex characters).

    Parameters
    ----------
    public_key : X25519PublicKey
        The coordinator's metrics public key.

    Returns
    -------
    str
        Hex of the first 8 bytes of SHA-256 over the raw 32-byte public key.
    """
    return _key_id_bytes(public_key).hex()


def save_metrics_keypair(
    private_path: str | Path, public_path: str | Path, *, overwrite: bool = False
) -> X25519PublicKey:
    """Generate a metrics key pair and write it as PEM (private 0600, public 0644).

    Parameters
    ----------
    private_path : str | Path
        Where the PKCS#8 PEM private key goes (coordinator only).
    public_path : str | Path
        Where the SubjectPublicKeyInfo PEM public key goes (shipped to every site).
    overwrite : bool (default: False)
        Replace existing files; without it an existing file raises :class:`SecurityError`.

    Returns
    -------
    X25519PublicKey
        The new public key.
    """
    private, public = generate_metrics_keypair()
    write_private(
        private_path,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        overwrite=overwrite,
    )
    write_public(
        public_path,
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        overwrite=overwrite,
    )
    _log.info("wrote metrics key pair %s (key id %s)", private_path, key_id(public))
    return public


_KEYGEN_HINT = (
    "create the coordinator's metrics key pair with `qanafed provision PROJECT.yaml --out KITS` "
    "(KITS/coordinator/metrics.key), or let `qanafed sim` create one (omit --metrics-key)"
)


def load_metrics_private_key(path: str | Path) -> X25519PrivateKey:
    """Load the coordinator's metrics private key (PEM, file mode 0600 required).

    Parameters
    ----------
    path : str | Path
        The PKCS#8 PEM file written by :func:`save_metrics_keypair`.

    Returns
    -------
    X25519PrivateKey
        The private key.

    Raises
    ------
    SecurityError
        Missing file, loose permissions, not PEM, or not an X25519 key.
    """
    data = read_private(path, how_to_create=_KEYGEN_HINT)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SecurityError(
            f"{path} is not an unencrypted PEM private key ({err})",
            f"point to the metrics private key, or {_KEYGEN_HINT}",
        ) from None
    if not isinstance(key, X25519PrivateKey):
        raise SecurityError(
            f"{path} holds an {_describe(key)}, not an X25519 metrics private key",
            f"point to the metrics private key, or {_KEYGEN_HINT}",
        )
    return key


def load_metrics_public_key(path: str | Path) -> X25519PublicKey:
    """Load the coordinator's metrics public key (PEM).

    Parameters
    ----------
    path : str | Path
        The SubjectPublicKeyInfo PEM file written by :func:`save_metrics_keypair`.

    Returns
    -------
    X25519PublicKey
        The public key.

    Raises
    ------
    SecurityError
        Missing file, not PEM, or not an X25519 key.
    """
    data = read_public(path, how_to_create=_KEYGEN_HINT)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SecurityError(
            f"{path} is not a PEM public key ({err})",
            "point to the coordinator's metrics public key from the site kit",
        ) from None
    if not isinstance(key, X25519PublicKey):
        raise SecurityError(
            f"{path} holds an {_describe(key)}, not an X25519 metrics public key",
            "point to the coordinator's metrics public key from the site kit",
        )
    return key


# ------------------------------------------------------------------------------------ envelope


@dataclass(frozen=True)
class _Header:
    version: int
    key_id: bytes
    ephemeral: bytes
    nonce: bytes
    run_id: str
    round: int
    site_id: str

    def encode(self) -> bytes:
        run, site = self.run_id.encode(), self.site_id.encode()
        return b"".join(
            [
                _FIXED.pack(MAGIC, self.version, self.key_id, self.ephemeral, self.nonce),
                struct.pack(">B", len(run)),
                run,
                struct.pack(">IB", self.round, len(site)),
                site,
            ]
        )


def _check_binding(run_id: str, round: int, site_id: str) -> None:
    for name, value in (("run_id", run_id), ("site_id", site_id)):
        if not isinstance(value, str) or not 1 <= len(value.encode()) <= 255:
            raise DataError(
                f"{name}={value!r} must be a non-empty string of at most 255 UTF-8 bytes",
                f"pass the {name} as a short string",
            )
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round <= _MAX_ROUND:
        raise DataError(
            f"round={round!r} must be an integer in [0, 2**32 - 1]", "pass the server round"
        )


def _as_envelope(envelope: bytes) -> bytes:
    """Check type, size, magic and version; return the envelope as ``bytes``."""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise MalformedReport(
            f"envelope must be bytes, got {type(envelope).__name__}",
            "pass the bytes produced by encrypt_report()",
        )
    envelope = bytes(envelope)
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise MalformedReport(
            f"envelope of {len(envelope)} bytes exceeds {MAX_ENVELOPE_BYTES}",
            "send smaller metrics (no per-image data)",
        )
    if len(envelope) < _FIXED.size:
        raise _truncated(envelope)
    magic, version = envelope[:4], envelope[4]
    if magic != MAGIC:
        raise MalformedReport(
            f"envelope starts with {magic!r}, not {MAGIC!r}: not a qanafed metrics report",
            "pass the bytes produced by encrypt_report()",
        )
    if version != ENVELOPE_VERSION:
        raise MalformedReport(
            f"envelope version {version} is not supported (this build reads {ENVELOPE_VERSION})",
            "use the same qanafed version on sites and coordinator",
        )
    return envelope


def _truncated(envelope: bytes) -> MalformedReport:
    return MalformedReport(
        f"envelope of {len(envelope)} bytes is truncated or not a qanafed metrics report",
        "pass the complete bytes produced by encrypt_report()",
    )


def _parse_header(envelope: bytes) -> _Header | None:
    """Parse the header as received (for diagnosis only); None if it does not parse."""
    _, version, kid, ephemeral, nonce = _FIXED.unpack_from(envelope)
    try:
        pos = _FIXED.size
        (run_len,) = struct.unpack_from(">B", envelope, pos)
        run_id = envelope[pos + 1 : pos + 1 + run_len].decode()
        pos += 1 + run_len
        round_, site_len = struct.unpack_from(">IB", envelope, pos)
        pos += 5
        site_id = envelope[pos : pos + site_len].decode()
        pos += site_len
    except (struct.error, UnicodeDecodeError):
        return None
    if len(run_id.encode()) != run_len or len(site_id.encode()) != site_len:
        return None
    if len(envelope) - pos < _TAG_LEN:
        return None
    return _Header(version, kid, ephemeral, nonce, run_id, round_, site_id)


def _derive_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=HKDF_INFO
    ).derive(shared)


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON types, or raise :class:`DataError` naming ``where``."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(
                f"metric {where} is {value!r}; NaN and infinities cannot be reported",
                "report None for an undefined metric (e.g. sklearn zero_division=0 or None)",
            )
        return value
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise DataError(f"metric {where} has a non-string key {key!r}", "use string keys")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    raise DataError(
        f"metric {where} has unsupported type {type(value).__name__}",
        "report numbers, strings, None, lists or dicts of them",
    )


def encrypt_report(
    metrics: Mapping[str, Any],
    recipient: X25519PublicKey,
    *,
    run_id: str,
    round: int,
    site_id: str,
) -> bytes:
    """Encrypt a metrics report for the coordinator (see the module docstring for the format).

    Parameters
    ----------
    metrics : Mapping[str, Any]
        JSON-like metrics: numbers, strings, None, lists, nested dicts (numpy values accepted).
    recipient : X25519PublicKey
        The coordinator's metrics public key.
    run_id : str
        The run the report belongs to (1..255 UTF-8 bytes).
    round : int
        The server round (0..2**32-1).
    site_id : str
        The reporting site (1..255 UTF-8 bytes).

    Returns
    -------
    bytes
        The envelope; it fits a Flower ``ConfigRecord`` value as is (``bytes`` is allowed there).

    Raises
    ------
    DataError
        Metrics not a dict, NaN/inf or unsupported values, or bad run/round/site values.
    """
    if not isinstance(metrics, Mapping):
        raise DataError(
            f"metrics must be a dict, got {type(metrics).__name__}", "pass a dict of metrics"
        )
    if not isinstance(recipient, X25519PublicKey):
        raise SecurityError(
            f"recipient must be an X25519PublicKey, got {type(recipient).__name__}",
            "load it with load_metrics_public_key()",
        )
    _check_binding(run_id, round, site_id)
    payload = {
        "v": ENVELOPE_VERSION,
        "report_id": os.urandom(16).hex(),
        "run_id": run_id,
        "round": round,
        "site_id": site_id,
        "metrics": _plain(metrics, "metrics"),
    }
    plaintext = json.dumps(
        payload, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    ).encode()

    ephemeral_private = X25519PrivateKey.generate()
    ephemeral = _raw_public(ephemeral_private.public_key())
    recipient_raw = _raw_public(recipient)
    key = _derive_key(ephemeral_private.exchange(recipient), ephemeral, recipient_raw)
    header = _Header(
        ENVELOPE_VERSION,
        _key_id_bytes(recipient),
        ephemeral,
        os.urandom(_NONCE_LEN),
        run_id,
        round,
        site_id,
    ).encode()
    nonce = header[_FIXED.size - _NONCE_LEN : _FIXED.size]
    envelope = header + AESGCM(key).encrypt(nonce, plaintext, header)
    _log.debug(
        "encrypted report for run=%s round=%d site=%s to key %s (%d bytes)",
        run_id,
        round,
        site_id,
        key_id(recipient),
        len(envelope),
    )
    return envelope


class ReportReceiver:
    """Open metrics envelopes addressed to one coordinator key, refusing replays.

    Parameters
    ----------
    private_key : X25519PrivateKey
        The coordinator's metrics private key.
    seen_ids : Iterable[str] (default: ())
        Report ids already accepted (from :meth:`seen_ids` before a restart) so that a restart
        cannot be used to replay an old report.
    """

    def __init__(self, private_key: X25519PrivateKey, seen_ids: Iterable[str] = ()) -> None:
        if not isinstance(private_key, X25519PrivateKey):
            raise SecurityError(
                f"private_key must be an X25519PrivateKey, got {type(private_key).__name__}",
                "load it with load_metrics_private_key()",
            )
        self._private = private_key
        self._public_raw = _raw_public(private_key.public_key())
        self._key_id = _key_id_bytes(private_key.public_key())
        self._seen: set[str] = {str(item) for item in seen_ids}

    @property
    def key_id(self) -> str:
        """Fingerprint of the public key this receiver opens reports for."""
        return self._key_id.hex()

    def seen_ids(self) -> frozenset[str]:
        """Report ids accepted so far (persist them; pass them back after a restart)."""
        return frozenset(self._seen)

    def _decrypt(self, header: _Header, body: bytes) -> bytes | None:
        """Decrypt ``body`` with ``header`` as associated data; None if it does not authenticate."""
        if len(body) < _TAG_LEN:
            return None
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(header.ephemeral))
        except ValueError:  # low-order point: all-zero shared secret
            return None
        key = _derive_key(shared, header.ephemeral, self._public_raw)
        try:
            return AESGCM(key).decrypt(header.nonce, body, header.encode())
        except InvalidTag:
            return None

    def open(
        self,
        envelope: bytes,
        *,
        run_id: str,
        round: int,
        site_id: str,
    ) -> dict[str, Any]:
        """Decrypt and check one report; return its metrics.

        The ciphertext is taken at the offset where the *expected* header (this receiver's key id
        and the given run/round/site) ends and decrypted with that header as associated data, so
        nothing is accepted unless it was made for exactly that. If it authenticates but the
        received header differs, the header was altered (:class:`TamperedReport`); if it does not,
        the received header tells a misaddressed report from a tampered one.

        Parameters
        ----------
        envelope : bytes
            Bytes from :func:`encrypt_report`.
        run_id : str
            The run this report must belong to.
        round : int
            The round this report must belong to.
        site_id : str
            The site this report must come from.

        Returns
        -------
        dict[str, Any]
            The metrics dict as the site sent it.

        Raises
        ------
        MalformedReport
            Truncated, garbage, unknown version, or an invalid payload.
        MisaddressedReport
            Made for another coordinator key, run, round or site.
        TamperedReport
            Header or ciphertext altered.
        ReplayedReport
            The same report was accepted before.
        """
        _check_binding(run_id, round, site_id)
        envelope = _as_envelope(envelope)
        _, _, _, ephemeral, nonce = _FIXED.unpack_from(envelope)
        expected = _Header(ENVELOPE_VERSION, self._key_id, ephemeral, nonce, run_id, round, site_id)
        aad = expected.encode()
        plaintext = self._decrypt(expected, envelope[len(aad) :])
        if plaintext is None:
            raise self._why_not(envelope, expected)
        if envelope[: len(aad)] != aad:
            raise TamperedReport(
                "metrics report header was altered in transit (it authenticates only against "
                f"key {self.key_id}, run {run_id!r}, round {round}, site {site_id!r})",
                "discard it; check the path between site and coordinator",
            )
        payload = self._payload(plaintext)
        inner = (payload["run_id"], payload["round"], payload["site_id"])
        if inner != (run_id, round, site_id):
            raise MisaddressedReport(
                f"report payload is for run/round/site {inner}, expected "
                f"{(run_id, round, site_id)}",
                "discard it; the site's software builds inconsistent reports",
            )
        report_id = payload["report_id"]
        if report_id in self._seen:
            raise ReplayedReport(
                f"report {report_id} from site {site_id!r} (run {run_id!r}, round {round}) "
                "was already accepted",
                "ignore the duplicate; if it repeats, someone is replaying site traffic",
            )
        self._seen.add(report_id)
        _log.debug(
            "accepted report %s from site %s run %s round %d", report_id, site_id, run_id, round
        )
        return payload["metrics"]

    def _why_not(self, envelope: bytes, expected: _Header) -> SecurityError:
        """Explain why an envelope did not authenticate against the expected header."""
        received = _parse_header(envelope)
        if received is None:
            return _truncated(envelope)
        if received.key_id != expected.key_id:
            return MisaddressedReport(
                f"report is encrypted for metrics key {received.key_id.hex()}, "
                f"this coordinator's key is {self.key_id}",
                "give the site the coordinator's current metrics public key (site kit)",
            )
        for name in ("run_id", "round", "site_id"):
            got, want = getattr(received, name), getattr(expected, name)
            if got != want:
                return MisaddressedReport(
                    f"report is for {name}={got!r}, expected {name}={want!r}",
                    "discard it; it belongs to another run, round or site",
                )
        return TamperedReport(
            f"metrics report from site {expected.site_id!r} (run {expected.run_id!r}, round "
            f"{expected.round}) failed authentication: ciphertext, nonce or key altered",
            "discard it; check the path between site and coordinator",
        )

    @staticmethod
    def _payload(plaintext: bytes) -> dict[str, Any]:
        def _no_constants(name: str) -> None:
            raise ValueError(f"non-finite number {name}")

        try:
            payload = json.loads(plaintext.decode(), parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError) as err:
            raise MalformedReport(
                f"authenticated report payload is not valid JSON ({err})",
                "use the same qanafed version on sites and coordinator",
            ) from None
        types = {
            "v": int,
            "report_id": str,
            "run_id": str,
            "round": int,
            "site_id": str,
            "metrics": dict,
        }
        if not isinstance(payload, dict) or any(
            not isinstance(payload.get(k), t) for k, t in types.items()
        ):
            raise MalformedReport(
                "authenticated report payload lacks fields or has wrong types "
                f"(expected {sorted(types)})",
                "use the same qanafed version on sites and coordinator",
            )
        return payload
