"""TLS policy: the server's and the client's contexts, the handshake, and who a certificate names.

Both sides speak HTTP/2 (ALPN ``h2``, which gRPC clients insist on). The server takes TLS 1.3
only and requires a client certificate issued by its CA (:func:`server_ssl_context`); the client
accepts TLS 1.2 and up and verifies the server against the CA (:func:`client_ssl_context`).

The server's handshake verifies the chain but not the validity period: that is checked per
connection (:func:`peer_from_certificate`, :func:`ca_validity_error`), so that an expired
certificate is answered UNAUTHENTICATED "certificate verify failed: certificate has expired" as
the spec says, instead of a refused connection that clients only see as UNAVAILABLE.

A client's role is read from its certificate subject's OU (``OU=admin`` or ``OU=viewer``,
case-insensitive; with several OUs the first that names a role wins): :func:`subject_ous` and
:func:`role_from_ous` are the one parser of it (:mod:`joblet.certs` only writes OUs).
"""

from __future__ import annotations

import datetime
import ssl
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import trio
from anyio.streams.tls import TLSStream
from cryptography import x509
from cryptography.x509.oid import NameOID

from joblet import logfmt
from joblet.rpc.auth import ROLES, Peer

_X509_V_FLAG_NO_CHECK_TIME = 0x200000
#: The key of an OU in the subject of :meth:`ssl.SSLSocket.getpeercert`'s dict.
_OU_DICT_NAME = "organizationalUnitName"


class CredentialFileError(Exception):
    """A certificate or key file of the client cannot be loaded.

    Attributes:
        ca: True if it is the CA certificate, False if the client's certificate or key.
        cause: What loading it raised.
    """

    def __init__(self, *, ca: bool, cause: OSError | ssl.SSLError) -> None:
        super().__init__(str(cause))
        self.ca = ca
        self.cause = cause


def server_ssl_context(ca_cert: Path, server_cert: Path, server_key: Path) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.3 only, a client certificate issued by ``ca_cert`` required.

    Raises:
        OSError: A file is missing or unreadable.
        ssl.SSLError: A file is not a certificate or key, or the key does not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(server_cert, server_key)
    ctx.load_verify_locations(cafile=ca_cert)
    # Validity periods are checked per connection instead (see the module's docstring).
    ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_ssl_context(ca_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The client's TLS context: verify the server against ``ca_cert``, present ``cert``/``key``.

    Raises:
        CredentialFileError: A file is missing, unreadable or not valid PEM, or the key does not
            match the certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cafile=ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialFileError(ca=True, cause=exc) from exc
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialFileError(ca=False, cause=exc) from exc
    return context


def ca_validity_error(ctx: ssl.SSLContext) -> str:
    """The time check the handshake skips, for the CAs themselves: an error unless one is valid."""
    now = time.time()
    for ca in ctx.get_ca_certs():
        start = ssl.cert_time_to_seconds(str(ca["notBefore"]))
        end = ssl.cert_time_to_seconds(str(ca["notAfter"]))
        if start <= now <= end:
            return ""
    return "certificate verify failed: the CA certificate is not valid now"


async def server_handshake(
    raw: anyio.abc.SocketStream, remote: str, ssl_context: ssl.SSLContext, *, deadline: float
) -> TLSStream | None:
    """The server's side of the handshake, done by ``deadline`` (:func:`trio.current_time`).

    Returns:
        The TLS stream, or None when the handshake failed or did not finish in time: the
        failure is logged in one line (a refused client certificate as "client authentication
        failed") and ``raw`` is closed.
    """
    try:
        with trio.fail_at(deadline):
            return await TLSStream.wrap(
                raw, server_side=True, ssl_context=ssl_context, standard_compatible=False
            )
    except ssl.SSLCertVerificationError as exc:
        reason = f"certificate verify failed: {exc.verify_message}"
        logfmt.error("client authentication failed", remote=remote, error=reason)
    except ssl.SSLError as exc:
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            reason = "no client certificate provided"
            logfmt.error("client authentication failed", remote=remote, error=reason)
        else:
            logfmt.warn("TLS handshake failed", remote=remote, error=exc.reason or str(exc))
    except trio.TooSlowError:
        logfmt.warn("TLS handshake timed out", remote=remote)
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
        logfmt.debug("connection closed during TLS handshake", remote=remote, error=str(exc))
    with trio.CancelScope(shield=True):
        await anyio.aclose_forcefully(raw)
    return None


# --- who a certificate names ----------------------------------------------------------------------


def subject_ous(cert: x509.Certificate | bytes | Mapping[str, Any]) -> list[str]:
    """The OUs of a certificate's subject, in order.

    Args:
        cert: A certificate as a cryptography object, DER bytes, or the dict of
            :meth:`ssl.SSLSocket.getpeercert` (what ``anyio``'s ``TLSAttribute.peer_certificate``
            holds).

    Raises:
        ValueError: ``cert`` is bytes that are not a DER certificate.
    """
    if isinstance(cert, bytes):
        cert = x509.load_der_x509_certificate(cert)
    if isinstance(cert, x509.Certificate):
        values: Iterable[object] = (
            attr.value
            for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        )
    else:
        values = (
            value for rdn in cert.get("subject", ()) for key, value in rdn if key == _OU_DICT_NAME
        )
    return [value for value in values if isinstance(value, str)]


def role_from_ous(ous: Iterable[str]) -> str | None:
    """The role that OUs grant: the first naming one of :data:`~joblet.rpc.auth.ROLES`
    (compared case-insensitively), lower-cased; None if none does."""
    for ou in ous:
        if ou.lower() in ROLES:
            return ou.lower()
    return None


def role_from_cert_subject(cert: x509.Certificate | bytes | Mapping[str, Any]) -> str | None:
    """The role a client certificate grants: its first OU naming a role, lower-cased.

    Args:
        cert: As for :func:`subject_ous`.

    Returns:
        ``"admin"``, ``"viewer"``, or None if no OU names a role.

    Raises:
        ValueError: ``cert`` is bytes that are not a DER certificate.
    """
    return role_from_ous(subject_ous(cert))


def validity_error(
    not_before: datetime.datetime, not_after: datetime.datetime, now: datetime.datetime
) -> str:
    """OpenSSL's wording when ``now`` is outside a certificate's validity, else ``""``."""
    if now < not_before:
        return "certificate verify failed: certificate is not yet valid"
    if now > not_after:
        return "certificate verify failed: certificate has expired"
    return ""


def peer_from_certificate(
    der: bytes | None, remote: str, *, now: datetime.datetime | None = None
) -> Peer:
    """Describe a verified client from its certificate.

    The validity period is checked here (see the module's docstring), so that an expired
    certificate gets the spec's UNAUTHENTICATED answer instead of a refused connection.

    Args:
        der: The certificate the TLS handshake verified (DER), or None if there was none.
        remote: The client's address.
        now: The time to check validity against (default: now).
    """
    if der is None:
        return Peer(remote=remote, problem="no client certificate provided")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:  # cannot happen after OpenSSL verified it, but never crash on it
        return Peer(remote=remote, problem=f"unreadable client certificate: {exc}")
    subject = cert.subject.rfc4514_string()
    now = now or datetime.datetime.now(datetime.UTC)
    expired = validity_error(cert.not_valid_before_utc, cert.not_valid_after_utc, now)
    if expired:
        return Peer(remote=remote, subject=subject, problem=expired, auth_error=expired)
    ous = subject_ous(cert)
    role = role_from_ous(ous)
    if role is not None:
        return Peer(remote=remote, subject=subject, role=role, problem="")
    found = ", ".join(repr(ou) for ou in ous) if ous else "none"
    problem = f"no role in client certificate: OU must be {' or '.join(ROLES)} (found: {found})"
    return Peer(remote=remote, subject=subject, problem=problem)
