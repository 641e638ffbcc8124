"""PKI for the Flower Deployment Engine: TLS CA and server certificate, SuperNode auth keys.

The SuperLink serves TLS with a certificate issued by a private CA
(``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``);
SuperNodes trust that CA (``flower-supernode --root-certificates ca.crt``). Node identity is not
mTLS but an EC key pair per SuperNode, matched to what flwr 1.41 reads:

* ``flower-supernode --auth-supernode-private-key FILE`` loads FILE with
  ``cryptography...load_ssh_private_key`` and requires an EC key: the **OpenSSH private key
  format** (the OpenSSH private-key armour); PKCS#8 PEM is refused.
* ``flwr supernode register FILE <federation>`` loads FILE with ``load_ssh_public_key`` and requires
  an EC key on a NIST curve: the **OpenSSH public key line** (``ecdsa-sha2-nistp384 AAAA...``).

All keys here are EC P-384 (SECP384R1), built with ``cryptography`` only (no openssl shell).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError, SecurityError
from common.keyfiles import read_private, read_public, write_private, write_public
from common.log import get_logger

__all__ = [
    "CURVE",
    "cert_fingerprint",
    "certificate_to_pem",
    "create_ca",
    "generate_supernode_keypair",
    "issue_server_cert",
    "load_certificate",
    "load_private_key",
    "private_key_to_pem",
    "save_certificate",
    "save_private_key",
    "verify_chain",
]

#: Curve of every key made here (the one flwr itself uses for SuperNode auth).
CURVE = ec.SECP384R1
#: Certificates start this long before "now", to tolerate clock skew between hosts.
_BACKDATE = dt.timedelta(minutes=5)

#: An ASCII DNS name, optionally with a leading wildcard label (``*.example.org``).
_DNS_NAME = re.compile(
    r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)

_log = get_logger("pki")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"certificate validity days={days!r} must be a positive integer")


def create_ca(
    common_name: str, days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed CA that only signs end-entity certificates (path length 0).

    Parameters
    ----------
    common_name : str
        Subject CN of the CA, e.g. ``"qanafed-ca <project>"``.
    days : int (default: 3650)
        Validity from now.

    Returns
    -------
    tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
        The CA key (P-384) and certificate.
    """
    _check_days(days)
    if not common_name:
        raise ConfigError("CA common_name is empty", "pass a name such as 'qanafed-ca'")
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _log.info("created CA %r (fingerprint %s)", common_name, cert_fingerprint(cert))
    return key, cert


def _san(hostnames: list[str], ips: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        if not isinstance(host, str) or not _DNS_NAME.fullmatch(host):
            raise ConfigError(
                f"server hostname {host!r} is not a valid DNS name",
                "use ASCII DNS names (punycode for international names); put IPs in ips",
            )
        try:
            ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host.lower()))
        else:
            raise ConfigError(
                f"server hostname {host!r} is an IP address", f"pass it in ips=[{host!r}]"
            )
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ConfigError(
                f"server IP {ip!r} is not an IPv4/IPv6 address", "pass e.g. '127.0.0.1' or '::1'"
            ) from None
    if not names:
        raise ConfigError(
            "server certificate needs at least one hostname or IP",
            "pass e.g. hostnames=['localhost'], ips=['127.0.0.1']",
        )
    return names


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostnames: list[str],
    ips: list[str],
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS server certificate for the SuperLink, signed by the CA.

    Parameters
    ----------
    ca_key : ec.EllipticCurvePrivateKey
        The CA private key.
    ca_cert : x509.Certificate
        The CA certificate.
    hostnames : list[str]
        DNS names clients connect to (e.g. ``["localhost", "superlink.example.org"]``).
    ips : list[str]
        IP addresses clients connect to (e.g. ``["127.0.0.1"]``).
    days : int (default: 825)
        Validity from now; never beyond the CA's own expiry.

    Returns
    -------
    tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
        The server key (P-384) and its certificate (SAN, serverAuth EKU, digitalSignature).
    """
    _check_days(days)
    names = _san(list(hostnames), list(ips))
    key = ec.generate_private_key(CURVE())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cn = hostnames[0] if hostnames else ips[0]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _log.info("issued server certificate for %s (fingerprint %s)", names, cert_fingerprint(cert))
    return key, cert


def generate_supernode_keypair() -> tuple[bytes, bytes]:
    """Generate a SuperNode authentication key pair in the formats flwr 1.41 reads.

    Returns
    -------
    tuple[bytes, bytes]
        ``(private_pem, public_bytes)``: the P-384 private key in OpenSSH format
        (the OpenSSH private-key armour, for ``--auth-supernode-private-key``; write it
        with :func:`common.keyfiles.write_private`) and the public key as one OpenSSH line
        (``ecdsa-sha2-nistp384 AAAA...``, for ``flwr supernode register``).
    """
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


# ------------------------------------------------------------------------------ serialisation


def private_key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM (what ``--ssl-keyfile`` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_to_pem(cert: x509.Certificate) -> bytes:
    """Serialise a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def save_private_key(
    path: str | Path, key: ec.EllipticCurvePrivateKey, *, overwrite: bool = False
) -> Path:
    """Write a private key as PKCS#8 PEM, mode 0600 (see :func:`common.keyfiles.write_private`)."""
    return write_private(path, private_key_to_pem(key), overwrite=overwrite)


def save_certificate(path: str | Path, cert: x509.Certificate, *, overwrite: bool = False) -> Path:
    """Write a certificate as PEM, mode 0644 (see :func:`common.keyfiles.write_public`)."""
    return write_public(path, certificate_to_pem(cert), overwrite=overwrite)


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load an EC PEM private key from a 0600 file; :class:`SecurityError` names the file."""
    data = read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise SecurityError(
            f"{path} is not an unencrypted PEM private key ({err})",
            "point to the PEM key written by qanafed provisioning",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(
            f"{path} holds a {type(key).__name__}, not an EC private key",
            "point to the PEM key written by qanafed provisioning",
        )
    return key


def load_certificate(path: str | Path) -> x509.Certificate:
    """Load a PEM certificate; :class:`SecurityError` names the file."""
    data = read_public(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise SecurityError(
            f"{path} is not a PEM certificate ({err})",
            "point to the .crt/.pem file written by qanafed provisioning",
        ) from None


def cert_fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint as colon-separated upper-case hex.

    The same string ``openssl x509 -noout -fingerprint -sha256`` prints, for comparison by eye.
    """
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# -------------------------------------------------------------------------------- verification


def _as_cert(value: x509.Certificate | str | Path, role: str) -> tuple[x509.Certificate, str]:
    if isinstance(value, x509.Certificate):
        return value, f"{role} certificate {value.subject.rfc4514_string()!r}"
    return load_certificate(value), f"{role} certificate {value}"


def _check_valid_now(cert: x509.Certificate, label: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise SecurityError(
            f"{label} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            f"(now {now:%Y-%m-%d %H:%M} UTC)",
            "check this host's clock, or reissue the certificate",
        )
    if now > cert.not_valid_after_utc:
        raise SecurityError(
            f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            "issue a new certificate with qanafed provisioning and redistribute the kit",
        )


def _san_covers(cert: x509.Certificate, hostname: str) -> tuple[bool, list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False, []
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    listed = [*dns, *map(str, ips)]
    try:
        return ipaddress.ip_address(hostname) in ips, listed
    except ValueError:
        pass
    host = hostname.lower().rstrip(".")
    for name in (d.lower() for d in dns):
        if name == host:
            return True, listed
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True, listed
    return False, listed


def verify_chain(
    ca_cert: x509.Certificate | str | Path,
    cert: x509.Certificate | str | Path,
    hostname: str,
    *,
    now: dt.datetime | None = None,
) -> None:
    """Check that a server certificate is one a SuperNode will accept for ``hostname``.

    Checks, each with its own message: the certificate is signed by the CA, both are valid now,
    the SAN covers ``hostname`` (DNS name or IP address); then full RFC 5280 path validation
    for a TLS server (``cryptography.x509.verification``: CA constraints, key usage, EKU).

    Parameters
    ----------
    ca_cert : x509.Certificate | str | Path
        The CA certificate, or its PEM file.
    cert : x509.Certificate | str | Path
        The server certificate, or its PEM file.
    hostname : str
        The DNS name or IP address SuperNodes connect to.
    now : datetime | None (default: None)
        Time of the check (UTC now if None).

    Raises
    ------
    SecurityError
        Naming the certificate (file) and host when any check fails.
    """
    ca, ca_label = _as_cert(ca_cert, "CA")
    leaf, label = _as_cert(cert, "server")
    now = now or _now()
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as err:
        raise SecurityError(
            f"{label} was not issued by {ca_label} ({err}); issuer is "
            f"{leaf.issuer.rfc4514_string()!r}",
            "use the CA certificate from the same provisioning run, or reissue the certificate",
        ) from None
    except InvalidSignature:
        raise SecurityError(
            f"{label} names {ca_label} as issuer but is not signed by its key",
            "use the CA certificate from the same provisioning run, or reissue the certificate",
        ) from None
    _check_valid_now(ca, ca_label, now)
    _check_valid_now(leaf, label, now)
    covered, listed = _san_covers(leaf, hostname)
    if not covered:
        raise SecurityError(
            f"{label} does not cover host {hostname!r}; its SubjectAlternativeName lists {listed}",
            f"reissue the server certificate with {hostname!r} in hostnames/ips, or connect "
            "using one of the listed names",
        )
    try:
        subject: xv.DNSName | xv.IPAddress
        try:
            subject = xv.IPAddress(ipaddress.ip_address(hostname))
        except ValueError:
            subject = xv.DNSName(hostname)
        verifier = xv.PolicyBuilder().store(xv.Store([ca])).time(now).build_server_verifier(subject)
        verifier.verify(leaf, [])
    except (xv.VerificationError, ValueError) as err:
        raise SecurityError(
            f"{label} failed TLS path validation against {ca_label} for host {hostname!r}: {err}",
            "reissue the server certificate with qanafed provisioning",
        ) from None
