"""PKI for the Deployment Engine: real TLS and gRPC handshakes, flwr-readable SuperNode keys."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import socket
import ssl
import stat
import threading
from concurrent import futures

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.errors import ConfigError, SecurityError
from common.keyfiles import write_private, write_public
from deploy.pki import (
    cert_fingerprint,
    certificate_to_pem,
    create_ca,
    generate_supernode_keypair,
    issue_server_cert,
    load_certificate,
    load_private_key,
    private_key_to_pem,
    save_certificate,
    save_private_key,
    verify_chain,
)


@pytest.fixture(scope="module")
def ca():
    return create_ca("qanafed-test-ca", days=30)


@pytest.fixture(scope="module")
def server(ca):
    ca_key, ca_cert = ca
    return issue_server_cert(ca_key, ca_cert, ["localhost"], ["127.0.0.1"], days=7)


@pytest.fixture()
def kit(tmp_path, ca, server):
    """The files an operator would hand to flower-superlink / flower-supernode."""
    paths = {
        "ca": save_certificate(tmp_path / "ca.crt", ca[1]),
        "cert": save_certificate(tmp_path / "server.crt", server[1]),
        "key": save_private_key(tmp_path / "server.key", server[0]),
    }
    return paths


# ----------------------------------------------------------------------------- certificates


def test_ca_and_server_certificate_profile(ca, server):
    _, ca_cert = ca
    _, cert = server
    ca_bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    assert not bc.ca
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ku.digital_signature and not ku.key_cert_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp384r1"
    assert cert.issuer == ca_cert.subject


@pytest.mark.parametrize(
    ("hostnames", "ips"),
    [([], []), (["127.0.0.1"], []), ([], ["localhost"]), (["bad host"], []), ([""], [])],
)
def test_bad_names_are_refused(ca, hostnames, ips):
    with pytest.raises(ConfigError):
        issue_server_cert(*ca, hostnames, ips, days=1)


def test_files_modes_and_pem_round_trip(kit, server):
    key, cert = server
    assert stat.S_IMODE(os.stat(kit["key"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kit["cert"]).st_mode) == 0o644
    assert load_certificate(kit["cert"]) == cert
    assert private_key_to_pem(load_private_key(kit["key"])) == private_key_to_pem(key)
    assert kit["cert"].read_bytes() == certificate_to_pem(cert)


def test_loose_tls_key_is_refused(kit):
    os.chmod(kit["key"], 0o644)
    with pytest.raises(SecurityError, match=f"chmod 600 {kit['key']}"):
        load_private_key(kit["key"])


def test_fingerprint_format(server):
    fingerprint = cert_fingerprint(server[1])
    assert len(fingerprint.split(":")) == 32 and fingerprint == fingerprint.upper()
    assert fingerprint != cert_fingerprint(create_ca("other", days=1)[1])


# ---------------------------------------------------------------------- real TLS handshakes


class _TlsServer:
    """A one-thread TLS echo-ok server on loopback, serving the issued certificate."""

    def __init__(self, cert_path, key_path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_path, key_path)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: expected in negative tests

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture()
def tls_server(kit):
    server = _TlsServer(kit["cert"], kit["key"])
    yield server
    server.close()


def _client_handshake(port: int, cafile, server_hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))  # check_hostname + CERT_REQUIRED
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(2)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_accepts_names_in_the_san(tls_server, kit, hostname):
    assert _client_handshake(tls_server.port, kit["ca"], hostname) == b"ok"


def test_tls_handshake_refuses_a_name_not_in_the_san(tls_server, kit):
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|doesn't match"):
        _client_handshake(tls_server.port, kit["ca"], "superlink.example.org")


def test_tls_handshake_refuses_another_ca(tls_server, tmp_path):
    other_ca = save_certificate(tmp_path / "other-ca.crt", create_ca("other", days=1)[1])
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _client_handshake(tls_server.port, other_ca, "localhost")


def test_grpc_tls_handshake_like_flower(kit):
    # Flower's SuperNode talks gRPC with ssl_channel_credentials(root_certificates=ca.crt).
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials([(kit["key"].read_bytes(), kit["cert"].read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    roots = grpc.ssl_channel_credentials(root_certificates=kit["ca"].read_bytes())
    try:
        for target, options in [
            (f"127.0.0.1:{port}", []),  # IP SAN
            (f"127.0.0.1:{port}", [("grpc.ssl_target_name_override", "localhost")]),  # DNS SAN
        ]:
            with grpc.secure_channel(target, roots, options=options) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
        bad = [("grpc.ssl_target_name_override", "superlink.example.org")]
        with grpc.secure_channel(f"127.0.0.1:{port}", roots, options=bad) as channel:
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=1.5)
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- verify_chain


def test_verify_chain_accepts_files_for_each_san(kit):
    verify_chain(kit["ca"], kit["cert"], "localhost")
    verify_chain(kit["ca"], kit["cert"], "127.0.0.1")


def test_verify_chain_names_the_host_not_covered(kit):
    with pytest.raises(SecurityError) as err:
        verify_chain(kit["ca"], kit["cert"], "10.0.0.5")
    message = str(err.value)
    assert "'10.0.0.5'" in message and str(kit["cert"]) in message and "localhost" in message


def test_verify_chain_detects_another_ca(kit, tmp_path):
    # Prepare: a CA with a different name, and an impostor CA with the *same* name.
    other = save_certificate(tmp_path / "other.crt", create_ca("other", days=1)[1])
    impostor = save_certificate(tmp_path / "same-name.crt", create_ca("qanafed-test-ca", 1)[1])
    # Execute / Assert
    for ca_path in (other, impostor):
        with pytest.raises(SecurityError, match="not (issued|signed) by") as err:
            verify_chain(ca_path, kit["cert"], "localhost")
        assert str(ca_path) in str(err.value) and str(kit["cert"]) in str(err.value)


def test_verify_chain_detects_an_expired_certificate(ca, server):
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)  # server cert: 7 days, CA: 30
    with pytest.raises(SecurityError, match="expired"):
        verify_chain(ca[1], server[1], "localhost", now=later)
    verify_chain(ca[1], server[1], "localhost", now=later - dt.timedelta(days=2))


def test_server_cert_never_outlives_its_ca():
    ca_key, ca_cert = create_ca("short-ca", days=2)
    _, cert = issue_server_cert(ca_key, ca_cert, ["localhost"], [], days=825)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


# ------------------------------------------------------------------- SuperNode auth keys


def test_supernode_keys_load_with_flwr_and_sign_verify(tmp_path):
    # The exact functions flwr 1.41 uses: flower-supernode --auth-supernode-private-key,
    # flwr supernode register <pub-key>, and the SuperLink's signature check.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        sign_message,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    # Prepare
    private_bytes, public_bytes = generate_supernode_keypair()
    private_path = write_private(tmp_path / "site-a.key", private_bytes)
    public_path = write_public(tmp_path / "site-a.pub", public_bytes)
    args = argparse.Namespace(
        auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
    )
    # Execute
    private_key, derived_public = _try_setup_client_authentication(args)
    registered = try_load_public_key(public_path)  # what the SuperLink stores
    signature = sign_message(private_key, b"2026-01-01T00:00:00Z")
    # Assert
    assert private_bytes.startswith(b"-----BEGIN OPENSSH " + b"PRIVATE KEY-----")
    assert public_bytes.startswith(b"ecdsa-sha2-nistp384 ")
    assert private_key.curve.name == "secp384r1"
    assert bytes_to_public_key(registered) == derived_public
    assert verify_signature(bytes_to_public_key(registered), b"2026-01-01T00:00:00Z", signature)
    _, other_public = generate_supernode_keypair()
    other = serialization.load_ssh_public_key(other_public)
    assert not verify_signature(other, b"2026-01-01T00:00:00Z", signature)


def test_flwr_refuses_pkcs8_for_supernode_auth():
    # Why the private key is OpenSSH: flwr loads it with load_ssh_private_key, which refuses
    # PKCS#8 PEM (checked on the name flwr imports; flwr's own wrapper would exit the process).
    flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")

    pkcs8 = private_key_to_pem(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError):
        flower_supernode.load_ssh_private_key(pkcs8, None)
    openssh, _ = generate_supernode_keypair()
    assert isinstance(
        flower_supernode.load_ssh_private_key(openssh, None), ec.EllipticCurvePrivateKey
    )


def test_supernode_keys_are_unique():
    assert generate_supernode_keypair()[1] != generate_supernode_keypair()[1]
