"""Who is calling, and what they may do.

A TCP connection is mutual TLS: the server has verified the client's certificate against the CA
before a single request arrives, and :func:`joblet.rpc.tls.peer_from_certificate` has read the
client's role from it. A Unix socket connection has no certificate: whoever can open the socket
file is :func:`local_peer`. What is left to decide here is whether the caller's role may call a
method (:func:`authorize`).

The server sets :data:`current_peer` once per connection; every request task of that connection
inherits it, so :func:`authorize` needs nothing but the method name.
"""

from __future__ import annotations

import contextvars
import re
import socket
import struct

import anyio.abc
import attrs

from joblet.core.errors import PermissionDenied, Unauthenticated

#: The roles a client certificate's OU can name.
ROLES: tuple[str, ...] = ("admin", "viewer")

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


def unix_peer(stream: anyio.abc.SocketStream) -> Peer:
    """The client of a Unix socket connection, named by its credentials (``SO_PEERCRED``)."""
    path = str(stream.extra(anyio.abc.SocketAttribute.local_address, "?"))
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    try:
        if sock is None:
            raise OSError("no socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, _gid = _UCRED.unpack(creds)
    except OSError:
        return local_peer(f"unix:{path}")
    return local_peer(f"unix:{path}", uid=uid, pid=pid)


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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
