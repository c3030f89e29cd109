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

import argparse
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.certs import CertError, CertPaths, init_certs
from joblet.config import Config
from joblet.configfile import ConfigError, dump_default_config, load_config

EXIT_FAILURE = 1
EXIT_USAGE = 2
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


class Fatal(Exception):
    """An expected reason the command cannot go on; its message is printed as is."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``joblet`` command line; returns the exit status.

    Args:
        argv: The arguments (without the program name); by default ``sys.argv[1:]``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "certs":
            return certs_init(args)
        sys.stdout.write(dump_default_config())
        return 0
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_USAGE)
    except Fatal as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def serve(args: argparse.Namespace) -> int:
    """``joblet serve``: run the daemon until SIGTERM or SIGINT.

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
        args.config,
        overrides={
            "stateDir": args.state_dir,
            "grpc.port": args.port,
            "grpc.address": args.address,
        },
    )
    config = attrs.evolve(config, state_dir=config.state_dir.resolve())
    logfmt.setup(_LOG_LEVELS[args.log_level])
    ssl_context = _prepare_tls(config)
    from joblet.sys.cgroups import CgroupUnavailable  # Linux-only machinery: imported to serve

    try:
        trio.run(_run_daemon, config, ssl_context)
    except CgroupUnavailable as exc:
        raise Fatal(f"cgroup setup failed: {exc}") from exc
    except OSError as exc:
        # Preparing the state directory or the cgroup parent: the node could not start.
        raise Fatal(f"cannot start: {exc}") from exc
    return 0


def certs_init(args: argparse.Namespace) -> int:
    """``joblet certs init``: create (or complete) a certificate directory.

    Raises:
        Fatal: The directory cannot be completed consistently.
    """
    try:
        paths = init_certs(Path(args.dir), hosts=args.host, days=args.days, force=args.force)
    except (CertError, ValueError, OSError) as exc:
        raise Fatal(f"certificate error: {exc}") from exc
    print(f"joblet: certificates in {paths.certs_dir.resolve()}:")
    for path in (paths.ca_cert, paths.ca_key, *paths.leaf_files()):
        print(f"  {path.name}")
    return 0


# --- serve ---------------------------------------------------------------------------------------


def _prepare_tls(config: Config) -> ssl.SSLContext:
    """Create ``<state>/certs`` if missing, load the server's TLS files, print how to connect."""
    from joblet.rpc.tls import server_ssl_context

    state = config.state_dir
    certs_dir = state / "certs"
    if not certs_dir.exists():
        address = config.grpc.address
        hosts = [] if address in _WILDCARD_ADDRESSES else [address]
        try:
            state.mkdir(parents=True, exist_ok=True)
            init_certs(certs_dir, hosts=hosts)
        except (CertError, ValueError, OSError) as exc:
            raise Fatal(f"cannot create certificates in {certs_dir}: {exc}") from exc
        print(f"joblet: created a CA and certificates in {certs_dir}", flush=True)
    sec = config.security
    ca, cert, key = (state / sec.ca_cert, state / sec.server_cert, state / sec.server_key)
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


async def _run_daemon(config: Config, ssl_context: ssl.SSLContext) -> None:
    """The daemon: the node and its gRPC servers, until SIGTERM or SIGINT, then a graceful stop.

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
            async with open_node(config) as node:
                service = JobService(node.engine, config)
                server = GrpcServer([service.definition()], ssl_context, grpc, listener=listener)
                await servers.start(server.run)
                state = config.state_dir
                persist = PersistService(
                    state / "logs",
                    state / "metrics",
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


# --- command line --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="joblet", description="joblet: run Linux jobs with isolation and resource limits."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="configuration file (joblet-config.yml)")
    serve.add_argument("--state-dir", help="directory of all state (default: ./state)")
    serve.add_argument("--port", type=int, help="port to listen on (default: 50051)")
    serve.add_argument("--address", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument(
        "--log-level", choices=sorted(_LOG_LEVELS), default="info", help="default: info"
    )

    certs = commands.add_parser("certs", help="manage mutual TLS certificates")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    init = certs_commands.add_parser(
        "init", help="create a CA, the server's and the admin and viewer client certificates"
    )
    init.add_argument(
        "--dir", default="state/certs", help="directory to write (default: state/certs)"
    )
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra server name or IP for the server certificate (repeatable)",
    )
    init.add_argument("--days", type=int, default=365, help="validity (default: 365)")
    init.add_argument("--force", action="store_true", help="replace existing files")

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    config_commands.add_parser("print", help="print the default configuration (YAML)")
    return parser


def _fail(message: str, status: int = EXIT_FAILURE) -> int:
    print(f"joblet: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
