"""Certificates: what `joblet certs init` writes, role extraction, and real TLS 1.3 handshakes."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from joblet import certs
from joblet.certs import CertError, CertPaths, init_certs
from joblet.rpc.tls import role_from_cert_subject

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """One certificate directory for the read-only tests (making keys is cheap but not free)."""
    return init_certs(tmp_path_factory.mktemp("certs") / "certs", hosts=["example.com", "10.1.2.3"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _store(paths: CertPaths) -> Store:
    return Store([_cert(paths.ca_cert)])


def _client_verifier(paths: CertPaths) -> ClientVerifier:
    """Web-PKI client validation, except that (like OpenSSL and gRPC) a SAN is not required."""
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    builder = PolicyBuilder().store(_store(paths))
    return builder.extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
    ).build_client_verifier()


# --- files ----------------------------------------------------------------------------------------


def test_init_writes_every_file_with_safe_modes(made: CertPaths) -> None:
    for key in (made.ca_key, made.server_key, made.admin_key, made.viewer_key, made.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
        key_obj = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert key_obj is not None
    for cert in (made.ca_cert, made.server_cert, made.admin_cert, made.viewer_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert.name
    assert stat.S_IMODE(made.certs_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in made.certs_dir.iterdir())
    assert names == sorted(
        [
            "ca-cert.pem",
            "ca-key.pem",
            "server-cert.pem",
            "server-key.pem",
            "admin-client-cert.pem",
            "admin-client-key.pem",
            "viewer-client-cert.pem",
            "viewer-client-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ]
    ), "no temporary files are left behind"


def test_client_pair_is_the_admin_pair(made: CertPaths) -> None:
    assert made.client_cert.read_bytes() == made.admin_cert.read_bytes()
    assert made.client_key.read_bytes() == made.admin_key.read_bytes()


def test_server_chain_and_sans(made: CertPaths) -> None:
    server = _cert(made.server_cert)
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(_store(made)).build_server_verifier(name)
        chain = verifier.verify(server, [])
        assert chain[-1] == _cert(made.ca_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(sans.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"localhost", socket.gethostname(), "example.com"} <= dns
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.mark.parametrize(("which", "ou"), [("admin", "admin"), ("viewer", "viewer")])
def test_client_certs_verify_and_carry_their_role(made: CertPaths, which: str, ou: str) -> None:
    cert = _cert(made.admin_cert if which == "admin" else made.viewer_cert)
    verifier = _client_verifier(made)
    verifier.verify(cert, [])
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{which}-client"
    assert [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] == [
        ou
    ]
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "joblet"
    assert role_from_cert_subject(cert) == ou


def test_server_cert_is_no_client_cert(made: CertPaths) -> None:
    verifier = _client_verifier(made)
    with pytest.raises(VerificationError):
        verifier.verify(_cert(made.server_cert), [])


def test_foreign_ca_does_not_verify(made: CertPaths, tmp_path: Path) -> None:
    foreign = certs.create_ca(tmp_path / "foreign")
    cert_path, _ = certs.issue_client_cert(foreign.cert, foreign.key, tmp_path, "intruder", "admin")
    verifier = _client_verifier(made)
    with pytest.raises(VerificationError):
        verifier.verify(_cert(cert_path), [])
    assert (tmp_path / "foreign" / "ca-cert.pem").exists()


def test_existing_files_are_kept(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in paths.certs_dir.iterdir()}
    init_certs(tmp_path / "c")
    assert {p.name: p.read_bytes() for p in paths.certs_dir.iterdir()} == before


def test_force_replaces_everything(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in paths.certs_dir.iterdir()}
    init_certs(tmp_path / "c", force=True)
    after = {p.name: p.read_bytes() for p in paths.certs_dir.iterdir()}
    assert before.keys() == after.keys()
    assert all(before[n] != after[n] for n in before)


def test_a_missing_pair_is_reissued_by_the_existing_ca(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c")
    ca_before = paths.ca_cert.read_bytes()
    paths.server_cert.unlink()
    paths.server_key.unlink()
    init_certs(tmp_path / "c", hosts=["new.example"])
    assert paths.ca_cert.read_bytes() == ca_before
    server = _cert(paths.server_cert)
    server.verify_directly_issued_by(_cert(paths.ca_cert))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "new.example" in sans.get_values_for_type(x509.DNSName)


def test_half_a_pair_is_an_error(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c")
    paths.viewer_key.unlink()
    with pytest.raises(CertError, match=r"viewer-client-cert\.pem without viewer-client-key\.pem"):
        init_certs(tmp_path / "c")


def test_a_leaf_from_another_ca_is_an_error(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c")
    other = init_certs(tmp_path / "other")
    paths.admin_cert.write_bytes(other.admin_cert.read_bytes())
    paths.admin_key.write_bytes(other.admin_key.read_bytes())
    with pytest.raises(CertError, match=r"admin-client-cert\.pem was not issued by the CA"):
        init_certs(tmp_path / "c")


def test_leaves_without_a_ca_are_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c")
    paths.ca_cert.unlink()
    paths.ca_key.unlink()
    with pytest.raises(CertError, match=r"exist without ca-cert\.pem"):
        init_certs(tmp_path / "c")
    assert not paths.ca_cert.exists()


def test_bad_host_and_days(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="invalid host name"):
        init_certs(tmp_path / "c", hosts=["bad host\u00e9"])
    with pytest.raises(ValueError, match="days must be positive"):
        init_certs(tmp_path / "d", days=0)


def test_credential_load_checks_the_key(made: CertPaths) -> None:
    cred = certs.Credential.load(made.admin_cert, made.admin_key)
    assert cred.cert == _cert(made.admin_cert)
    with pytest.raises(CertError, match="is not the private key of"):
        certs.Credential.load(made.admin_cert, made.viewer_key)


# --- roles ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> certs.Credential:
    return certs.create_ca()


@pytest.mark.parametrize(
    ("ou", "role"),
    [
        ("admin", "admin"),
        ("viewer", "viewer"),
        ("ADMIN", "admin"),
        ("Viewer", "viewer"),
        (None, None),
        ("reader", None),
        (["engineering", "Viewer", "admin"], "viewer"),
        (["admin", "viewer"], "admin"),
        (["team-a", "team-b"], None),
        ("admins", None),
    ],
)
def test_role_from_cert_subject(
    ca: certs.Credential, tmp_path: Path, ou: str | list[str] | None, role: str | None
) -> None:
    cert_path, _ = certs.issue_client_cert(ca.cert, ca.key, tmp_path, "someone", ou)
    cert = _cert(cert_path)
    assert role_from_cert_subject(cert) == role
    assert role_from_cert_subject(cert.public_bytes(serialization.Encoding.DER)) == role


def test_role_from_getpeercert_dict() -> None:
    peer = {
        "subject": (
            (("organizationName", "joblet"),),
            (("organizationalUnitName", "ops"),),
            (("organizationalUnitName", "VIEWER"),),
            (("commonName", "x"),),
        )
    }
    assert role_from_cert_subject(peer) == "viewer"
    assert role_from_cert_subject({"subject": ()}) is None
    assert role_from_cert_subject({}) is None


def test_role_from_garbage_bytes_raises() -> None:
    with pytest.raises(ValueError):
        role_from_cert_subject(b"not a certificate")


def test_issue_client_cert_from_files(made: CertPaths, tmp_path: Path) -> None:
    cert_path, key_path = certs.issue_client_cert(
        made.ca_cert, made.ca_key, tmp_path, "from-files", "viewer"
    )
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    _cert(cert_path).verify_directly_issued_by(_cert(made.ca_cert))


# --- TLS 1.3 mutual authentication with the generated files ---------------------------------------


def _server_context(paths: CertPaths) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(paths.ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(paths.server_cert, paths.server_key)
    return ctx


def _client_context(ca_cert: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def _exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> dict[str, object]:
    """Handshake over a real socket pair and send one message each way; report what happened."""
    a, b = trio.socket.socketpair()
    server = trio.SSLStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = trio.SSLStream(trio.SocketStream(b), client_ctx, server_hostname=hostname)
    out: dict[str, object] = {}

    async def serve() -> None:
        try:
            await server.do_handshake()
            out["version"] = server.version()
            out["peer"] = server.getpeercert()
            out["peer_der"] = server.getpeercert(binary_form=True)
            out["received"] = await server.receive_some(100)
            await server.send_all(b"pong")
        except trio.BrokenResourceError as exc:
            out["server_error"] = exc.__cause__
        finally:
            await trio.aclose_forcefully(server)

    async def connect() -> None:
        try:
            await client.do_handshake()
            await client.send_all(b"ping")
            out["reply"] = await client.receive_some(100)
        except trio.BrokenResourceError as exc:
            out["client_error"] = exc.__cause__
        finally:
            await trio.aclose_forcefully(client)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(connect)
    return out


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
async def test_tls13_mutual_handshake_admin(made: CertPaths, hostname: str) -> None:
    out = await _exchange(
        _server_context(made),
        _client_context(made.ca_cert, made.client_cert, made.client_key),
        hostname,
    )
    assert out.get("server_error") is None and out.get("client_error") is None, out
    assert out["version"] == "TLSv1.3"
    assert (out["received"], out["reply"]) == (b"ping", b"pong")
    assert isinstance(out["peer_der"], bytes)
    assert role_from_cert_subject(out["peer_der"]) == "admin"
    assert isinstance(out["peer"], dict)
    assert role_from_cert_subject(out["peer"]) == "admin"


async def test_tls13_mutual_handshake_viewer(made: CertPaths) -> None:
    out = await _exchange(
        _server_context(made), _client_context(made.ca_cert, made.viewer_cert, made.viewer_key)
    )
    assert isinstance(out.get("peer_der"), bytes), out
    assert role_from_cert_subject(out["peer_der"]) == "viewer"  # type: ignore[arg-type]


async def test_client_without_certificate_is_rejected(made: CertPaths) -> None:
    out = await _exchange(_server_context(made), _client_context(made.ca_cert, None, None))
    assert isinstance(out.get("server_error"), ssl.SSLError), out
    assert "reply" not in out


async def test_client_from_a_foreign_ca_is_rejected(made: CertPaths, tmp_path: Path) -> None:
    foreign = certs.create_ca()
    cert, key = certs.issue_client_cert(foreign.cert, foreign.key, tmp_path, "intruder", "admin")
    out = await _exchange(_server_context(made), _client_context(made.ca_cert, cert, key))
    assert isinstance(out.get("server_error"), ssl.SSLError), out
    assert "certificate verify failed" in str(out["server_error"])
    assert "reply" not in out


async def test_expired_client_is_rejected(made: CertPaths, tmp_path: Path) -> None:
    cert, key = certs.issue_client_cert(
        made.ca_cert,
        made.ca_key,
        tmp_path,
        "old",
        "admin",
        not_before=NOW - dt.timedelta(days=10),
        not_after=NOW - dt.timedelta(days=1),
    )
    out = await _exchange(_server_context(made), _client_context(made.ca_cert, cert, key))
    assert isinstance(out.get("server_error"), ssl.SSLError), out
    assert "certificate has expired" in str(out["server_error"])


async def test_client_rejects_a_server_of_another_ca(made: CertPaths, tmp_path: Path) -> None:
    other = init_certs(tmp_path / "other")
    out = await _exchange(
        _server_context(other), _client_context(made.ca_cert, made.client_cert, made.client_key)
    )
    assert isinstance(out.get("client_error"), ssl.SSLError), out
    assert "certificate verify failed" in str(out["client_error"])


async def test_client_rejects_a_name_not_in_the_sans(made: CertPaths) -> None:
    out = await _exchange(
        _server_context(made),
        _client_context(made.ca_cert, made.client_cert, made.client_key),
        "not-this-server.invalid",
    )
    assert isinstance(out.get("client_error"), ssl.SSLCertVerificationError), out
