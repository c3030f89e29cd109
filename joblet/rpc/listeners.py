"""Listening sockets: TCP for the mutual-TLS servers, Unix for the local Persist Service socket.

Both are opened before the server that accepts on them starts, so that "address in use" is
reported as itself (see :class:`joblet.rpc.server.GrpcServer`). A Unix socket file is created with
its final mode already and removed when its listener closes (:class:`UnixSocketListener`).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import trio

from joblet import logfmt


async def open_listener(address: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind the server's TCP socket(s) (every address ``address`` resolves to).

    Raises:
        OSError: The address cannot be bound (in use, not local, ...).
    """
    return await anyio.create_tcp_listener(local_host=address, local_port=port)


class UnixSocketListener(anyio.abc.SocketListener):
    """A listening Unix socket that removes its socket file when closed.

    Made by :func:`open_unix_listener`. The file is removed only if it is still the one this
    listener created (another process may have replaced it meanwhile).
    """

    def __init__(self, inner: anyio.abc.SocketListener, path: Path, inode: tuple[int, int]) -> None:
        self._inner = inner
        self.path = path
        self._inode = inode
        self._closed = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._inner.extra(anyio.abc.SocketAttribute.raw_socket)

    async def accept(self) -> anyio.abc.SocketStream:
        """Wait for a connection."""
        return await self._inner.accept()

    async def aclose(self) -> None:
        """Close the socket and remove its file; idempotent."""
        try:
            await self._inner.aclose()
        finally:
            if not self._closed:
                self._closed = True
                _unlink_if_same(self.path, self._inode)


def _unlink_if_same(path: Path, inode: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logfmt.warn("socket file could not be removed", path=str(path), error=str(exc))


#: Longest path a Unix socket can be bound to (``sun_path`` holds 108 bytes with the NUL).
UNIX_PATH_MAX = 107


async def open_unix_listener(path: Path, mode: int = 0o600) -> UnixSocketListener:
    """Listen on a Unix socket at ``path``, created with ``mode``.

    The socket file never exists with a wider mode (it is created with ``mode`` already, see
    unix(7)), and its parent directory is created if missing. A socket file left behind by a
    process that is gone (a crash) is replaced; one that a live process listens on is not.

    Raises:
        OSError: ``path`` is too long, is in use by a live listener (EADDRINUSE), exists and is
            not a socket (EEXIST), or cannot be bound.
    """
    sock, inode = await trio.to_thread.run_sync(_bind_unix, path, mode)
    try:
        inner = await anyio.abc.SocketListener.from_socket(sock)
    except BaseException:
        sock.close()
        _unlink_if_same(path, inode)
        raise
    return UnixSocketListener(inner, path, inode)


def _bind_unix(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"longer than {UNIX_PATH_MAX} bytes", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The file bind() creates takes the socket inode's mode (less the umask): set it first,
        # so there is no moment where the file is more open than ``mode``.
        os.fchmod(sock.fileno(), mode)
        sock.bind(os.fspath(path))
        os.chmod(path, mode)  # the umask may have taken bits away
        st = os.lstat(path)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: left behind by a process that is gone.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError:
        pass  # cannot tell (e.g. the backlog is full): assume it is alive
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "in use by another process", str(path))


def listener_addresses(listener: anyio.abc.Listener[Any]) -> list[str]:
    """The ``host:port`` each socket of ``listener`` listens on."""
    parts = getattr(listener, "listeners", [listener])
    return [
        format_address(part.extra(anyio.abc.SocketAttribute.local_address, "?")) for part in parts
    ]


def format_address(addr: Any) -> str:
    """A socket address as ``host:port`` (``[v6]:port``), or as itself (a Unix path)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
