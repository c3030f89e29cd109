"""A small joblet client: purerpc over mutual TLS, on trio.

:func:`open_client` connects (TCP, then the TLS handshake) *before* it starts the connection's
background tasks, so a refused connection or a rejected certificate surfaces as itself; it then
yields a :class:`JobClient` whose methods are the RPCs ``rnx`` uses.

Every failure is one of the :class:`ClientError` subclasses below, each with a one-line message;
``cli.rnx`` turns them into exit statuses, in one table. Exceptions that are not about the server
(``KeyboardInterrupt``, a ``BrokenPipeError`` from the caller's own output) pass through unchanged.

purerpc 0.8 is in maintenance mode and has gaps a CLI cannot live with; they are patched here, in
subclasses, rather than by forking it:

- when the connection drops (EOF, TLS alert, socket error), its reader task just returns, and
  every call waiting for a response hangs forever. :class:`_GrpcSocket` closes the waiting streams
  instead, so they fail, and remembers why: :class:`ConnectionLost`, or :class:`TlsError` for a
  TLS alert, or for a server that hangs up before saying anything (TLS 1.3 checks our certificate
  only after the handshake, and a server refusing it often closes without sending the alert);
- it ignores ``RST_STREAM``, which would also hang the call: :class:`_GrpcConnection` turns it into
  an ``UNAVAILABLE`` status;
- it enforces no deadlines: unary calls get :data:`CALL_TIMEOUT` here (log streams have none; they
  last as long as the job).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
import purerpc
import trio
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpc_socket import SocketWrapper
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import ResponseEnded

from joblet.protocol import joblet_grpc
from joblet.protocol import joblet_pb2 as pb
from joblet.rpc.tls import CredentialFileError, client_ssl_context

#: Port used when ``--server`` names only a host.
DEFAULT_PORT = 50051
#: Ceiling on TCP connect plus TLS handshake: an unreachable host fails in bounded time.
CONNECT_TIMEOUT = 10.0
#: Ceiling on one unary call (purerpc enforces no gRPC deadline of its own).
CALL_TIMEOUT = 30.0

_T = TypeVar("_T")


class ClientError(Exception):
    """Base class of every error the client reports; ``str()`` is a one-line message."""


class ConfigError(ClientError):
    """A local setting is unusable: a bad ``--server`` address, a missing or invalid PEM file."""


class ConnectFailed(ClientError):
    """The server could not be reached (refused, unresolvable, timed out)."""


class TlsError(ClientError):
    """The TLS handshake failed or the server rejected our certificate."""


class ConnectionLost(ClientError):
    """The connection broke while a call was in progress."""


class CallTimedOut(ClientError):
    """The server did not answer a unary call within :data:`CALL_TIMEOUT`."""


class ProtocolFailure(ClientError):
    """The server's answer broke the gRPC protocol."""


class RpcError(ClientError):
    """The server answered with a non-OK gRPC status.

    Attributes:
        code: The status code's name, e.g. ``"NOT_FOUND"``.
        message: The server's message, e.g. ``"job not found: f47ac10b"``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message or f"server error: {code}")
        self.code = code
        self.message = message


@attrs.frozen
class ClientSettings:
    """Where the server is and which credentials to present.

    Attributes:
        server: ``host:port`` (``[v6addr]:port`` for IPv6; the port defaults to 50051).
        cert: The client certificate (PEM); its OU is our role.
        key: The client certificate's private key (PEM).
        ca: The CA certificate (PEM) the server's certificate must chain to.
    """

    server: str = "localhost:50051"
    cert: Path = Path("certs/client-cert.pem")
    key: Path = Path("certs/client-key.pem")
    ca: Path = Path("certs/ca-cert.pem")


def parse_server_address(server: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``, or a bare host) into host and port.

    Raises:
        ConfigError: The address is malformed or the port is out of range.
    """
    text = server.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ConfigError(f"invalid server address: {server!r} (expected [addr]:port)")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        # Only a bare IPv6 address may hold several colons (and then has no port).
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ConfigError(
                f"invalid server address: {server!r} (write IPv6 as [addr]:port)"
            ) from None
    if not host:
        raise ConfigError(f"invalid server address: {server!r} (expected host:port)")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"invalid server address: {server!r} (bad port {port_text!r})")
    return host, int(port_text)


def make_ssl_context(settings: ClientSettings) -> ssl.SSLContext:
    """The client side of mutual TLS (:func:`joblet.rpc.tls.client_ssl_context`) for ``settings``.

    Raises:
        ConfigError: A file is missing, unreadable or not valid PEM, or the key does not match
            the certificate.
    """
    for path, what in (
        (settings.cert, "certificate"),
        (settings.key, "private key"),
        (settings.ca, "CA certificate"),
    ):
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path}")
    try:
        return client_ssl_context(settings.ca, settings.cert, settings.key)
    except CredentialFileError as exc:
        if exc.ca:
            raise ConfigError(
                f"cannot load CA certificate {settings.ca}: {_describe(exc.cause)}"
            ) from None
        raise ConfigError(
            f"cannot load client certificate {settings.cert} with key {settings.key}: "
            f"{_describe(exc.cause)}"
        ) from None


@asynccontextmanager
async def open_client(settings: ClientSettings) -> AsyncIterator[JobClient]:
    """Connect to the joblet server and yield a client for it.

    The connection (and its background reader and writer tasks) lives until the block exits.

    Raises:
        ConfigError: ``settings`` is unusable.
        ConnectFailed: The server cannot be reached.
        TlsError: The TLS handshake failed.
        ClientError: Any other failure of a call made in the block (see :class:`JobClient`).
    """
    host, port = parse_server_address(settings.server)
    context = make_ssl_context(settings)
    stream = await _connect(host, port, context, settings.server)
    async with stream:
        grpc_socket = _GrpcSocket(GRPCConfiguration(client_side=True), stream, settings.server)
        try:
            async with grpc_socket:
                yield JobClient(_Channel(grpc_socket, host, port), grpc_socket)
        except BaseExceptionGroup as group:
            # The connection's task groups wrap whatever the block or their own tasks raised.
            error = collapse_exception_group(group)
            if isinstance(error, ssl.SSLError):
                raise TlsError(f"TLS error with {settings.server}: {_describe(error)}") from None
            if isinstance(error, anyio.BrokenResourceError):
                raise ConnectionLost(
                    f"connection to {settings.server} lost: {_describe(error)}"
                ) from None
            raise error from error.__cause__


class JobClient:
    """The ``joblet.JobService`` calls ``rnx`` makes, with our errors instead of purerpc's.

    Every method raises :class:`RpcError` for a non-OK status, :class:`ConnectionLost` or
    :class:`TlsError` when the connection breaks, :class:`ProtocolFailure` for a garbled answer,
    and (unary calls only) :class:`CallTimedOut`.
    """

    def __init__(self, channel: _Channel, grpc_socket: _GrpcSocket) -> None:
        self._stub = joblet_grpc.JobServiceStub(channel)
        self._socket = grpc_socket

    async def run_job(self, request: pb.RunJobReq) -> pb.RunJobRes:
        """Start a job."""
        res: pb.RunJobRes = await self._unary(self._stub.RunJob, request)
        return res

    async def get_job_status(self, job_id: str) -> pb.GetJobStatusRes:
        """A job's full record; ``job_id`` may be a unique prefix."""
        res: pb.GetJobStatusRes = await self._unary(
            self._stub.GetJobStatus, pb.GetJobStatusReq(id=job_id)
        )
        return res

    async def stop_job(self, job_id: str) -> pb.StopJobRes:
        """Stop a running job (SIGTERM, then SIGKILL)."""
        res: pb.StopJobRes = await self._unary(self._stub.StopJob, pb.StopJobReq(id=job_id))
        return res

    async def delete_job(self, job_id: str) -> pb.DeleteJobRes:
        """Delete an ended job with its logs, metrics and metadata."""
        res: pb.DeleteJobRes = await self._unary(self._stub.DeleteJob, pb.DeleteJobReq(id=job_id))
        return res

    async def delete_all_jobs(self) -> pb.DeleteAllJobsRes:
        """Delete every ended job."""
        res: pb.DeleteAllJobsRes = await self._unary(
            self._stub.DeleteAllJobs, pb.DeleteAllJobsReq()
        )
        return res

    async def list_jobs(self) -> list[pb.Job]:
        """Every job the server knows."""
        res: pb.Jobs = await self._unary(self._stub.ListJobs, pb.EmptyRequest())
        return list(res.jobs)

    async def stream_logs(
        self, job_id: str, sink: Callable[[bytes], object], *, offset: int = 0
    ) -> int:
        """Pass a job's output to ``sink``, chunk by chunk, until the server ends the stream.

        The server sends what the job has written so far, then live output, and ends the stream
        when the job has ended. Exceptions raised by ``sink`` propagate unchanged.

        Args:
            job_id: The job's id or a unique prefix of it.
            sink: Called with each chunk's bytes, in order.
            offset: Byte offset of the job's output to start at.

        Returns:
            The number of bytes passed to ``sink``.
        """
        total = 0
        with self._call_errors():
            call: AsyncGenerator[pb.DataChunk, None] = self._stub.GetJobLogs(
                pb.GetJobLogsReq(id=job_id, offset=offset)
            )
            async with aclosing(call) as chunks:
                async for chunk in chunks:
                    payload: bytes = chunk.payload
                    total += len(payload)
                    sink(payload)
        return total

    async def stream_metrics(
        self, job_id: str, sink: Callable[[pb.JobMetricsSample], object]
    ) -> int:
        """Pass a job's metrics samples to ``sink``, one by one, until the server ends the stream.

        The server sends the samples taken so far, then live ones, and ends the stream when the
        job has ended. Exceptions raised by ``sink`` propagate unchanged.

        Returns:
            The number of samples passed to ``sink``.
        """
        count = 0
        with self._call_errors():
            call: AsyncGenerator[pb.JobMetricsSample, None] = self._stub.GetJobMetrics(
                pb.JobMetricsRequest(id=job_id)
            )
            async with aclosing(call) as samples:
                async for sample in samples:
                    count += 1
                    sink(sample)
        return count

    async def _unary(self, method: Callable[[Any], Awaitable[_T]], request: object) -> _T:
        with self._call_errors(), trio.fail_after(CALL_TIMEOUT):
            return await method(request)

    @contextmanager
    def _call_errors(self) -> Iterator[None]:
        """Run one call: fail fast on a connection already lost, and turn what the call raises
        into our errors (the one translation for every call)."""
        self._socket.raise_if_lost()
        try:
            yield
        except trio.TooSlowError:  # only a unary call's CALL_TIMEOUT raises it
            raise CallTimedOut(
                f"no answer from {self._socket.server} within {CALL_TIMEOUT:g}s"
            ) from None
        except purerpc.RpcFailedError as exc:
            raise _rpc_error(exc) from None
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._socket.lost_error() from None
        except purerpc.ProtocolError as exc:
            raise ProtocolFailure(f"protocol error: {exc}") from None


class _Channel:
    """What :class:`purerpc.Client` needs of a channel: its socket and the ``:authority``."""

    def __init__(self, grpc_socket: _GrpcSocket, host: str, port: int) -> None:
        self._grpc_socket = grpc_socket
        self._host = host
        self._port = port


class _GrpcConnection(GRPCConnection):  # type: ignore[misc]
    """purerpc's protocol state machine, reporting a reset stream instead of ignoring it."""

    heard_from_server = False

    def receive_data(self, data: bytes) -> Any:
        """Parse bytes from the server (and note that some arrived)."""
        self.heard_from_server = True
        return super().receive_data(data)

    def _stream_reset(self, event: Any) -> list[ResponseEnded]:
        status = purerpc.Status(purerpc.StatusCode.UNAVAILABLE, "stream reset by the server")
        return [ResponseEnded(event.stream_id, status)]


class _GrpcSocket(GRPCProtoSocket):  # type: ignore[misc]
    """purerpc's client connection, failing pending calls when the connection breaks."""

    def __init__(self, config: GRPCConfiguration, stream: anyio.abc.ByteStream, server: str):
        super().__init__(config, stream)
        # Swap in our protocol state machine; the socket wrapper must share it.
        self._grpc_connection = _GrpcConnection(config=config)
        self._socket = SocketWrapper(self._grpc_connection, stream)
        self.server = server
        self._lost = False
        self._lost_cause: BaseException | None = None

    async def _reader_thread(self) -> None:
        try:
            await super()._reader_thread()
        except Exception as exc:  # the connection broke: a TLS alert, a reset, garbage
            self._lost_cause = exc
        finally:
            # EOF or failure: nothing more will arrive, so end every stream still waiting.
            self._lost = True
            for stream in list(self._streams.values()):
                stream._incoming_events[0].close()

    def raise_if_lost(self) -> None:
        """Fail fast when the connection is already gone (a new call would wait forever)."""
        if self._lost:
            raise self.lost_error()

    def lost_error(self) -> ClientError:
        """The error describing why the connection ended."""
        cause = self._lost_cause
        if isinstance(cause, ssl.SSLError):
            return TlsError(f"TLS error with {self.server}: {_describe(cause)}")
        if cause is not None:
            return ConnectionLost(f"connection to {self.server} lost: {_describe(cause)}")
        if not self._grpc_connection.heard_from_server:
            # A gRPC server speaks first (its SETTINGS frame). One that hangs up right after the
            # TLS handshake has almost always refused our certificate: TLS 1.3 checks it only
            # then, and the alert often never makes it to us.
            return TlsError(
                f"{self.server} closed the connection without answering "
                "(client certificate rejected?)"
            )
        return ConnectionLost(f"connection to {self.server} closed by the server")


async def _connect(
    host: str, port: int, context: ssl.SSLContext, server: str
) -> anyio.abc.ByteStream:
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await anyio.connect_tcp(
                host,
                port,
                ssl_context=context,
                tls_hostname=host,
                # purerpc's own setting: a peer closing without close_notify is a plain EOF.
                tls_standard_compatible=False,
            )
    except trio.TooSlowError:
        raise ConnectFailed(
            f"cannot connect to {server}: timed out after {CONNECT_TIMEOUT:g}s"
        ) from None
    except ssl.SSLError as exc:
        raise TlsError(f"TLS handshake with {server} failed: {_describe(exc)}") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {server}: {_describe(exc)}") from None


def _rpc_error(exc: purerpc.RpcFailedError) -> RpcError:
    status = exc.status
    return RpcError(status.status_code.name, _one_line(status.status_message))


def _describe(exc: BaseException) -> str:
    """A short, one-line reason for an OS, TLS or connection error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # trio's own strerror also names the address
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return _describe(cause)
    if isinstance(cause, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_describe(e) for e in cause.exceptions))
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def collapse_exception_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group wrapped, or one standing for several.

    ``trio.Cancelled`` is ignored (it only says a sibling failed). Several exceptions are never
    reduced to one of them: they become a :class:`ClientError` caused by ``group``, or
    ``KeyboardInterrupt`` if one of them is.
    """
    leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    if len(leaves) == 1:
        return leaves[0]
    if not leaves:
        return group
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return KeyboardInterrupt()
    error = ClientError("; ".join(dict.fromkeys(_describe(e) for e in leaves)))
    error.__cause__ = group
    return error


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]
