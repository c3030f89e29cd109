"""The ``joblet`` command: the daemon and the tools to set it up.

::

    joblet serve [--config FILE] [--state-dir DIR] [--port N] [--address A] [--log-level L]
    joblet certs init [--dir DIR] [--host H ...] [--days N] [--force]
    joblet config print

``serve`` keeps all of its state in one directory (``./state`` by default). On first start it
creates ``<state>/certs/`` (a CA, the server's certificate and admin and viewer client
certificates) and prints how to reach it with ``rnx``. Next to the main service it serves the
Persist Service (historical log and metric queries) on ``<state>/run/persist-grpc.sock``, a Unix
socket only root may use (see :mod:`joblet.rpc.persist_service`). SIGTERM or SIGINT stops it
gracefully: running jobs are stopped, logs flushed, and it exits 0.

Expected failures print one line, ``joblet: <message>``, and exit non-zero (2 for usage and
configuration errors, 1 for the rest); never a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import attrs
import trio
from cyclopts import App, CycloptsError, Parameter

import joblet
from joblet import logfmt
from joblet.certs import CertError, CertPaths, init_certs
from joblet.config import Config, ConfigError, dump_default_config, load_config

if TYPE_CHECKING:  # the daemon's machinery is imported when serving only
    from joblet.actors.root import NodeClaim

EXIT_FAILURE = 1
EXIT_USAGE = 2
LogLevel = Literal["debug", "error", "info", "warn"]
_LOG_LEVELS: dict[LogLevel, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


class Fatal(Exception):
    """An expected reason the command cannot go on; its message is printed as is."""


class UsageError(Exception):
    """The command line names no command (cyclopts checks the rest)."""


app = App(
    name="joblet",
    help="joblet: run Linux jobs with isolation and resource limits.",
    version=joblet.__version__,
)
certs_app = App(name="certs", help="Manage mutual TLS certificates.")
config_app = App(name="config", help="The configuration file.")
app.command(certs_app)
app.command(config_app)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``joblet`` command line; returns the exit status.

    Errors become one line and an exit status here, and only here.

    Args:
        argv: The arguments (without the program name); by default ``sys.argv[1:]``.
    """
    tokens = sys.argv[1:] if argv is None else list(argv)
    try:
        result = app(tokens, exit_on_error=False, print_error=False, result_action="return_value")
    except (CycloptsError, UsageError) as exc:
        return _fail(" ".join(str(exc).split()), EXIT_USAGE)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_USAGE)
    except Fatal as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return result if isinstance(result, int) else 0


@app.command(name="serve")
def serve(
    *,
    config_file: Annotated[Path | None, Parameter(name="--config")] = None,
    state_dir: str | None = None,
    port: int | None = None,
    address: str | None = None,
    log_level: LogLevel = "info",
) -> int:
    """Run the daemon until SIGTERM or SIGINT.

    Args:
        config_file: Configuration file (joblet-config.yml).
        state_dir: Directory of all state (default: ./state).
        port: Port to listen on (default: 50051).
        address: Address to listen on (default: 0.0.0.0).
        log_level: Least severe log records written.

    Raises:
        ConfigError: The configuration is invalid.
        Fatal: The daemon cannot run here (not Linux, not root, certificates, address, cgroups).
    """
    if not sys.platform.startswith("linux"):
        raise Fatal(f"job execution requires Linux server (current: {sys.platform})")
    if os.geteuid() != 0:
        raise Fatal(
            "joblet serve must run as root: jobs need namespaces and cgroups "
            f"(current uid: {os.geteuid()})"
        )
    config = load_config(
        config_file,
        overrides={"stateDir": state_dir, "grpc.port": port, "grpc.address": address},
    )
    config = attrs.evolve(config, state_dir=config.state_dir.resolve())
    logfmt.setup(_LOG_LEVELS[log_level])
    # Linux-only machinery: imported to serve.
    from joblet.actors.root import claim_node
    from joblet.sys.cgroups import CgroupUnavailable
    from joblet.sys.locks import LockHeld
    from joblet.sys.seccomp import SeccompProfileError

    try:
        # Before anything in the state directory is touched (certificates, sockets, database).
        with claim_node(config) as claim:
            ssl_context = _prepare_tls(config)
            trio.run(_run_daemon, config, ssl_context, claim)
    except LockHeld as exc:
        raise Fatal(f"cannot start: {exc}") from exc
    except SeccompProfileError as exc:
        raise Fatal(f"invalid isolation.seccomp: {exc}") from exc
    except CgroupUnavailable as exc:
        raise Fatal(f"cgroup setup failed: {exc}") from exc
    except OSError as exc:
        # Preparing the state directory or the cgroup parent: the node could not start.
        raise Fatal(f"cannot start: {exc}") from exc
    return 0


@certs_app.command(name="init")
def certs_init(
    *,
    directory: Annotated[Path, Parameter(name="--dir")] = Path("state/certs"),
    host: Annotated[list[str] | None, Parameter(negative_iterable="")] = None,
    days: int = 365,
    force: Annotated[bool, Parameter(negative="")] = False,
) -> int:
    """Create a CA, the server's and the admin and viewer client certificates.

    An existing directory is completed; its files are kept unless ``--force``.

    Args:
        directory: Directory to write.
        host: Extra server name or IP for the server certificate (repeatable).
        days: Validity of the certificates, in days.
        force: Replace existing files.

    Raises:
        Fatal: The directory cannot be completed consistently.
    """
    try:
        paths = init_certs(directory, hosts=host or [], days=days, force=force)
    except (CertError, ValueError, OSError) as exc:
        raise Fatal(f"certificate error: {exc}") from exc
    print(f"joblet: certificates in {paths.certs_dir.resolve()}:")
    for path in (paths.ca_cert, paths.ca_key, *paths.leaf_files()):
        print(f"  {path.name}")
    return 0


@config_app.command(name="print")
def config_print() -> int:
    """Print the default configuration (YAML), every key with its doc."""
    sys.stdout.write(dump_default_config())
    return 0


@app.default
@certs_app.default
@config_app.default
def _no_command(*tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)]) -> int:
    if not tokens:
        raise UsageError("missing command (see --help)")
    what = "option" if tokens[0].startswith("-") else "command"
    raise UsageError(f"unknown {what} {tokens[0]!r} (see --help)")


# --- serve ---------------------------------------------------------------------------------------


def _prepare_tls(config: Config) -> ssl.SSLContext:
    """Create ``<state>/certs`` if missing, load the server's TLS files, print how to connect."""
    from joblet.rpc.tls import server_ssl_context

    layout = config.layout
    certs_dir = layout.certs_dir
    if not certs_dir.exists():
        address = config.grpc.address
        hosts = [] if address in _WILDCARD_ADDRESSES else [address]
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
            init_certs(certs_dir, hosts=hosts)
        except (CertError, ValueError, OSError) as exc:
            raise Fatal(f"cannot create certificates in {certs_dir}: {exc}") from exc
        print(f"joblet: created a CA and certificates in {certs_dir}", flush=True)
    sec = config.security
    ca, cert, key = (layout.under(p) for p in (sec.ca_cert, sec.server_cert, sec.server_key))
    try:
        context = server_ssl_context(ca, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise Fatal(f"cannot load the server's TLS files ({ca}, {cert}, {key}): {exc}") from exc
    paths = CertPaths.in_dir(certs_dir)
    if paths.admin_cert.exists() and paths.admin_key.exists():
        host = config.grpc.address
        host = "localhost" if host in _WILDCARD_ADDRESSES else host
        host = f"[{host}]" if ":" in host else host
        print(f"joblet: admin client certificate: {paths.admin_cert}", flush=True)
        print(
            f"joblet: try: rnx --server={host}:{config.grpc.port} --ca={ca} "
            f"--cert={paths.admin_cert} --key={paths.admin_key} job list",
            flush=True,
        )
    return context


async def _run_daemon(config: Config, ssl_context: ssl.SSLContext, claim: NodeClaim) -> None:
    """The daemon: the node and its gRPC servers, until SIGTERM or SIGINT, then a graceful stop.

    ``claim`` holds the state directory and the cgroup parent (see ``actors.root.claim_node``).

    The main server (JobService) and the Persist Service (its Unix socket and, with
    ``persist.server.tls.enabled``, its TCP port) are started side by side. On a signal they stop
    accepting and drain (:meth:`joblet.rpc.server.GrpcServer.stop`) while the node stops its jobs.
    """
    from joblet.actors.root import open_node
    from joblet.rpc.listeners import open_listener
    from joblet.rpc.persist_service import PersistServer, PersistService, open_persist_listeners
    from joblet.rpc.server import GrpcServer
    from joblet.rpc.service import JobService

    grpc = config.grpc
    try:
        # Bound before the node starts, so "address in use" is reported as itself.
        listener = await open_listener(grpc.address, grpc.port)
    except OSError as exc:
        raise Fatal(f"cannot listen on {grpc.address}:{grpc.port}: {exc.strerror or exc}") from exc
    try:
        persist_listeners = await open_persist_listeners(config)
    except OSError as exc:
        await listener.aclose()
        raise Fatal(f"persist service: {exc.strerror or exc}") from exc
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # The servers' nursery outlives the node, so that their drain can outlast its teardown.
        async with listener, persist_listeners, trio.open_nursery() as servers:
            async with open_node(config, claim=claim) as node:
                service = JobService(node.engine, config)
                server = GrpcServer([service.definition()], ssl_context, grpc, listener=listener)
                await servers.start(server.run)
                persist = PersistService(
                    config.layout.logs_dir,
                    config.layout.metrics_dir,
                    known_jobs=lambda: [job.id for job in node.engine.list_jobs()],
                    max_send_msg_size=grpc.max_send_msg_size,
                )
                persist_server = PersistServer(persist, persist_listeners, ssl_context, config)
                await servers.start(persist_server.run)
                async for signum in signals:
                    logfmt.info("shutdown requested", signal=signal.Signals(signum).name)
                    break
                # Drain, don't cut: the listeners close now, calls in flight get the servers'
                # drain timeout. Leaving the node stops every job (gracefully, then by force)
                # and flushes the logs, so log streams end with their jobs meanwhile.
                server.stop()
                persist_server.stop()


def _fail(message: str, status: int = EXIT_FAILURE) -> int:
    print(f"joblet: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
