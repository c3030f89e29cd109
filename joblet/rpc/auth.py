"""Who is calling, and what they may do.

Every connection is mutual TLS: the server has verified the client's certificate against the CA
before a single request arrives (:mod:`joblet.rpc.server`). What is left to decide here is the
client's role, read from the certificate subject's OU (``OU=admin`` or ``OU=viewer``,
case-insensitive; with several OUs the first that names a role wins), and whether that role may
call a method.

The server sets :data:`current_peer` once per connection; every request task of that connection
inherits it, so :func:`authorize` needs nothing but the method name.
"""

from __future__ import annotations

import contextvars
import datetime
import re

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from joblet.certs import ROLES, role_from_cert_subject
from joblet.core.errors import PermissionDenied, Unauthenticated

#: Methods a viewer may call: the read-only ones of ``joblet.JobService`` (spec 001's role table)
#: and the Persist Service's queries. An admin may call every method, including ones added later.
VIEWER_METHODS: frozenset[str] = frozenset(
    {
        "GetJobStatus",
        "ListJobs",
        "GetJobLogs",
        "GetJobMetrics",
        "GetWorkflowStatus",
        "ListWorkflows",
        "GetWorkflowJobs",
        # joblet.persist.PersistService
        "QueryLogs",
        "QueryMetrics",
    }
)

NO_TLS = "no TLS information found"


@attrs.frozen
class Peer:
    """The client at the other end of one connection.

    Attributes:
        remote: Its address, ``host:port``.
        subject: Its certificate's subject (RFC 4514), empty without a certificate.
        role: ``"admin"`` or ``"viewer"``, or None when the certificate grants no role.
        problem: Why there is no role (empty when there is one).
        auth_error: Set when the certificate must not be trusted at all (e.g. it has expired);
            every request then fails UNAUTHENTICATED with exactly this message.
    """

    remote: str
    subject: str = ""
    role: str | None = None
    problem: str = NO_TLS
    auth_error: str = ""

    @property
    def name(self) -> str:
        """The certificate's CN (or its whole subject if it has none), for log lines."""
        match = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)*)", self.subject)
        return match.group(1) if match else self.subject or "-"


#: The peer of the connection the current request arrived on; None outside of a connection.
current_peer: contextvars.ContextVar[Peer | None] = contextvars.ContextVar(
    "joblet_current_peer", default=None
)


def local_peer(remote: str, *, uid: int | None = None, pid: int | None = None) -> Peer:
    """The client of a Unix socket served without TLS (the Persist Service's socket).

    Such a socket has no certificates: its file mode decides who may connect, and whoever can
    connect may call everything it serves, so the client gets the ``admin`` role.

    Args:
        remote: ``unix:<socket path>``.
        uid: The client process's user id (``SO_PEERCRED``), for log lines.
        pid: Its process id.
    """
    subject = "" if uid is None else f"uid={uid},pid={pid}"
    return Peer(remote=remote, subject=subject or "unix socket client", role="admin", problem="")


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

    The TLS handshake verifies the chain but not the validity period (see
    :func:`joblet.rpc.server.server_ssl_context`): it is checked here, so that an expired
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
    role = role_from_cert_subject(cert)
    if role is not None:
        return Peer(remote=remote, subject=subject, role=role, problem="")
    ous = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    found = ", ".join(repr(ou) for ou in ous) if ous else "none"
    problem = f"no role in client certificate: OU must be {' or '.join(ROLES)} (found: {found})"
    return Peer(remote=remote, subject=subject, problem=problem)


def operation_name(method: str) -> str:
    """The spec's name of an RPC in messages: ``RunJob`` is ``run_job``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", method).lower()


def is_allowed(role: str, method: str) -> bool:
    """Whether ``role`` may call ``method`` (a method name of JobService or PersistService)."""
    if role == "admin":
        return True
    return role == "viewer" and method in VIEWER_METHODS


def authorize(method: str, peer: Peer | None = None) -> Peer:
    """Check that the caller may call ``method``.

    Args:
        method: The RPC's name, e.g. ``"RunJob"``.
        peer: The caller; by default the current connection's (:data:`current_peer`).

    Returns:
        The caller, known to hold a role that allows ``method``.

    Raises:
        Unauthenticated: The caller has no certificate naming a role.
        PermissionDenied: Its role does not allow ``method``.
    """
    if peer is None:
        peer = current_peer.get()
    if peer is None:
        raise Unauthenticated(f"failed to extract client role: {NO_TLS}")
    if peer.auth_error:
        raise Unauthenticated(peer.auth_error)
    if peer.role is None:
        raise Unauthenticated(f"failed to extract client role: {peer.problem}")
    if not is_allowed(peer.role, method):
        raise PermissionDenied(
            f"role {peer.role} is not allowed to perform operation {operation_name(method)}"
        )
    return peer
