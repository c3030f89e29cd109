"""Certificates for mutual TLS: a private CA, the server's and role-bearing client certificates.

``joblet certs init`` (:func:`init_certs`) writes, in one directory::

    ca-cert.pem, ca-key.pem                        the certificate authority
    server-cert.pem, server-key.pem                the daemon (SANs: localhost, 127.0.0.1, ::1,
                                                   the host name, extra hosts)
    admin-client-cert.pem, admin-client-key.pem    CN=admin-client, OU=admin, O=joblet
    viewer-client-cert.pem, viewer-client-key.pem  CN=viewer-client, OU=viewer, O=joblet
    client-cert.pem, client-key.pem                a copy of the admin pair (rnx's default paths)

Keys are ECDSA P-256 (fast to make, accepted by TLS 1.3 everywhere) in unencrypted PKCS#8 PEM, mode
0600, written atomically. A client's role is the first OU of its certificate's subject that names
a role; the server reads it with :func:`joblet.rpc.tls.role_from_cert_subject`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Organization (O) of every certificate we issue.
ORGANIZATION = "joblet"
#: Validity of a CA made by :func:`init_certs`, at least as long as its leaf certificates'.
CA_DAYS = 3650
#: Certificates start being valid this long before "now", for clocks that disagree a little.
CLOCK_SKEW = dt.timedelta(minutes=5)

_CERT_MODE = 0o644
_KEY_MODE = 0o600


class CertError(Exception):
    """The certificate directory is inconsistent or a certificate cannot be made."""


@attrs.frozen
class Credential:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate, PEM-encoded."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files atomically: the key with mode 0600, the certificate 0644."""
        write_atomic(key_path, self.key_pem(), _KEY_MODE)
        write_atomic(cert_path, self.cert_pem(), _CERT_MODE)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Credential:
        """Read a PEM certificate and its PEM private key.

        Raises:
            CertError: A file is unreadable or malformed, the key is not an EC key, or the key does
                not belong to the certificate.
        """
        cert = load_certificate(cert_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CertError(f"cannot load private key {key_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{key_path}: not an EC private key")
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise CertError(f"{key_path} is not the private key of {cert_path}")
        return cls(cert, key)


@attrs.frozen
class CertPaths:
    """Where :func:`init_certs` keeps each file."""

    certs_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    viewer_cert: Path
    viewer_key: Path
    client_cert: Path
    client_key: Path

    def leaf_files(self) -> tuple[Path, ...]:
        """Every file but the CA's."""
        return (
            self.server_cert,
            self.server_key,
            self.admin_cert,
            self.admin_key,
            self.viewer_cert,
            self.viewer_key,
            self.client_cert,
            self.client_key,
        )

    @classmethod
    def in_dir(cls, certs_dir: Path) -> CertPaths:
        """The standard file names under ``certs_dir``."""
        d = certs_dir
        return cls(
            certs_dir=d,
            ca_cert=d / "ca-cert.pem",
            ca_key=d / "ca-key.pem",
            server_cert=d / "server-cert.pem",
            server_key=d / "server-key.pem",
            admin_cert=d / "admin-client-cert.pem",
            admin_key=d / "admin-client-key.pem",
            viewer_cert=d / "viewer-client-cert.pem",
            viewer_key=d / "viewer-client-key.pem",
            client_cert=d / "client-cert.pem",
            client_key=d / "client-key.pem",
        )


def init_certs(
    certs_dir: Path, *, hosts: Sequence[str] = (), days: int = 365, force: bool = False
) -> CertPaths:
    """Create the CA, the server certificate and the admin and viewer client certificates.

    Files that exist are kept unless ``force``; a missing one is issued by the existing CA. A kept
    certificate must have been issued by ``ca-cert.pem`` and match its key, so the directory is
    never left inconsistent.

    Args:
        certs_dir: Directory to write to (created with mode 0700 if missing).
        hosts: Extra server names or IP addresses for the server certificate's SANs, besides
            localhost, 127.0.0.1, ::1 and this machine's host name.
        days: Validity of the server and client certificates (the CA gets at least ``CA_DAYS``).
        force: Replace every file.

    Raises:
        CertError: A file is unreadable, half of a pair is missing, or a kept certificate was not
            issued by the CA; or a host name is invalid.
        ValueError: ``days`` is not positive.
    """
    if days <= 0:
        raise ValueError(f"days must be positive (got {days})")
    paths = CertPaths.in_dir(certs_dir)
    certs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    ca = _existing_pair(paths.ca_cert, paths.ca_key, None, force)
    if ca is None:
        orphans = [p.name for p in paths.leaf_files() if p.exists()] if not force else []
        if orphans:
            # A new CA could not vouch for them: refuse before writing anything.
            raise CertError(
                f"{', '.join(orphans)} exist without ca-cert.pem: remove them, "
                "or regenerate with force"
            )
        ca = create_ca(days=max(days, CA_DAYS))
        ca.write(paths.ca_cert, paths.ca_key)

    def server() -> Credential:
        return issue_server_cert(ca, hosts, days=days)

    def client(name: str, role: str) -> Credential:
        return _issue_client(ca, name, (role,), _validity(days, None, None))

    _ensure(paths.server_cert, paths.server_key, ca, force, server)
    admin = _ensure(
        paths.admin_cert, paths.admin_key, ca, force, lambda: client("admin-client", "admin")
    )
    _ensure(
        paths.viewer_cert, paths.viewer_key, ca, force, lambda: client("viewer-client", "viewer")
    )
    _ensure(paths.client_cert, paths.client_key, ca, force, lambda: admin)
    return paths


def create_ca(
    out_dir: Path | None = None,
    *,
    common_name: str = "joblet-ca",
    organization: str = ORGANIZATION,
    days: int = CA_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Credential:
    """Make a self-signed certificate authority.

    Args:
        out_dir: If given, also write ``ca-cert.pem`` and ``ca-key.pem`` there (tests use this for
            a second, foreign CA).
        common_name: The CA's CN.
        organization: The CA's O.
        days: Validity from now, unless ``not_after`` is given.
        not_before: Start of validity (default: now minus a small clock skew).
        not_after: End of validity.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start, end = _validity(days, not_before, not_after)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    ca = Credential(cert, key)
    if out_dir is not None:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca.write(out_dir / "ca-cert.pem", out_dir / "ca-key.pem")
    return ca


def issue_server_cert(
    ca: Credential,
    hosts: Sequence[str] = (),
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Credential:
    """Issue the daemon's certificate.

    Its SANs are localhost, 127.0.0.1, ::1, this machine's host name and ``hosts`` (DNS names or IP
    addresses), without duplicates.

    Raises:
        CertError: A host name cannot be put in a certificate.
    """
    names: list[str] = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts]
    sans: list[x509.GeneralName] = []
    for host in names:
        san = _general_name(host)
        if san not in sans:
            sans.append(san)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "joblet-server"),
        ]
    )
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _leaf_builder(ca, subject, key, _validity(days, not_before, not_after))
    cert = (
        builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Credential(cert, key)


def issue_client_cert(
    ca_cert: x509.Certificate | Path,
    ca_key: ec.EllipticCurvePrivateKey | Path,
    out_dir: Path,
    name: str,
    ou: str | Sequence[str] | None,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    organization: str = ORGANIZATION,
) -> tuple[Path, Path]:
    """Issue a client certificate and write it as ``<name>-cert.pem`` / ``<name>-key.pem``.

    Made for tests: expired or not-yet-valid certificates, none or several OUs.

    Args:
        ca_cert: The issuing CA's certificate, or the path of its PEM file.
        ca_key: The CA's private key, or the path of its PEM file.
        out_dir: Directory to write to.
        name: The subject's CN and the files' prefix.
        ou: The subject's OU(s), in order; None for none.
        not_before: Start of validity (default: now minus a small clock skew).
        not_after: End of validity (default: a year from now).
        organization: The subject's O.

    Returns:
        The certificate's and the key's paths.
    """
    if isinstance(ca_cert, Path):
        ca_cert = load_certificate(ca_cert)
    if isinstance(ca_key, Path):
        loaded = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CertError(f"{ca_key}: not an EC private key")
        ca_key = loaded
    ous: tuple[str, ...] = () if ou is None else (ou,) if isinstance(ou, str) else tuple(ou)
    cred = _issue_client(
        Credential(ca_cert, ca_key), name, ous, _validity(365, not_before, not_after), organization
    )
    cert_path, key_path = out_dir / f"{name}-cert.pem", out_dir / f"{name}-key.pem"
    cred.write(cert_path, key_path)
    return cert_path, key_path


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate.

    Raises:
        CertError: The file is unreadable or not a PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot load certificate {path}: {exc}") from exc


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically; the file never exists with looser permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so a key is never readable by others, even briefly.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _issue_client(
    ca: Credential,
    name: str,
    ous: Sequence[str],
    validity: tuple[dt.datetime, dt.datetime],
    organization: str = ORGANIZATION,
) -> Credential:
    attrs_ = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
    attrs_ += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou) for ou in ous]
    attrs_.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _leaf_builder(ca, x509.Name(attrs_), key, validity)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Credential(cert, key)


def _leaf_builder(
    ca: Credential,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    validity: tuple[dt.datetime, dt.datetime],
) -> x509.CertificateBuilder:
    start, end = validity
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """What every key we issue may do: sign (ECDSA: the TLS handshake); a CA's also certificates
    and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    return start, end


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return x509.DNSName(host)
    except ValueError as exc:
        raise CertError(f"invalid host name for the server certificate: {host!r}") from exc


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _existing_pair(
    cert_path: Path, key_path: Path, ca: Credential | None, force: bool
) -> Credential | None:
    """The pair on disk if it is to be kept, None if it is to be (re)made."""
    if force:
        return None
    has_cert, has_key = cert_path.exists(), key_path.exists()
    if not has_cert and not has_key:
        return None
    if has_cert != has_key:
        present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
        raise CertError(
            f"found {present.name} without {missing.name}: remove it, or regenerate with force"
        )
    cred = Credential.load(cert_path, key_path)
    if ca is not None:
        try:
            cred.cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertError(
                f"{cert_path.name} was not issued by the CA in this directory: "
                "regenerate with force"
            ) from exc
    return cred


def _ensure(
    cert_path: Path,
    key_path: Path,
    ca: Credential,
    force: bool,
    make: Callable[[], Credential],
) -> Credential:
    cred = _existing_pair(cert_path, key_path, ca, force)
    if cred is None:
        cred = make()
        cred.write(cert_path, key_path)
    return cred
