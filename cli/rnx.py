"""rnx: the joblet command-line client.

Synopsis::

    rnx [GLOBAL OPTIONS] job run [--max-cpu N] [--max-memory MB] [--max-iobps BPS] [--cpu-cores SET]
                                 [--env K=V ...] [--network host|none] [--wait] COMMAND [ARGS...]
    rnx [GLOBAL OPTIONS] job status|stop|log JOB_ID
    rnx [GLOBAL OPTIONS] job metrics [--chart] JOB_ID
    rnx [GLOBAL OPTIONS] job list

Global options (``--server``, ``--cert``, ``--key``, ``--ca``, ``--json``) may come anywhere
before the job's command; each is taken from the flag, else from its environment variable
(``JOBLET_SERVER``, ``JOBLET_CERT_PATH``, ``JOBLET_KEY_PATH``, ``JOBLET_CA_PATH``), else its
default.

``job run``: everything from the first word that is not an option of ``rnx`` (or after ``--``)
is the job's command line, passed through untouched even when it looks like an option
(``rnx job run ls -la``, ``rnx job run python3 script.py --max-cpu=5``). :func:`protect_command`
does that split before cyclopts sees the arguments.

Decisions where the spec is silent:

- Exit statuses: the table below, :data:`EXIT_OK` ... :data:`EXIT_INTERRUPTED`, applied in one
  place (:func:`exit_status_for`). Every failure prints exactly one line, ``rnx: error: <message>``,
  on stderr and never a traceback (set ``RNX_DEBUG=1`` to get one for unexpected errors).
- ``job run --wait`` follows the job's output to stdout and exits with the job's status
  (:func:`job_exit_status`): 0 when COMPLETED, the exit code when FAILED (128+N when killed by
  signal N, as the server reports it), 143 (128+SIGTERM, what a shell shows for a terminated
  process) when STOPPED, whose exit code is -1. It says ``Job started: <id>`` on stderr first, and
  how the job ended on stderr when it did not complete, so stdout carries only the job's output.
  With ``--json`` it prints nothing while waiting, then the final status object.
- ``job log`` writes the job's bytes to stdout as they come, unchanged, also with ``--json``
  (arbitrary bytes have no faithful JSON form; use ``status --json`` for metadata). The spec's
  ``Logs for job ...`` header goes to stderr, and only when stdout is a terminal, so pipes get
  exactly the job's output. A closed stdout (``| head -1``) ends ``rnx`` quietly with status 0;
  Ctrl+C ends it quietly with status 130.
- ``job list`` prints nothing when there are no jobs (``--json``: ``[]``).
- ``job metrics`` prints each sample as it comes, in the spec's block (``Timestamp:`` / ``CPU:
  ..., Memory: ..., I/O Read: ..., I/O Write: ...`` / ``Network RX: ..., Network TX: ...`` only
  for a job with its own network / a blank line), until the job ends; with ``--json`` one JSON
  object per line (JSON Lines, ``jq -c '.cpu.usagePercent'`` works as the spec shows). ``--chart``
  waits for the job to end (at once for an ended job), then draws its CPU and memory history as
  wide as the terminal (:mod:`cli.chart`); it is printed once, not redrawn, so it also works in a
  pipe or a log file. ``--chart`` with ``--json`` is a usage error.
- Job ids may be any unique prefix; the server resolves them.
"""

from __future__ import annotations

import os
import shutil
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import attrs
import trio
from cyclopts import App, CycloptsError, Group, Parameter, validators

import joblet
from cli import chart as metrics_chart
from cli import output
from cli.client import (
    CallTimedOut,
    ClientError,
    ClientSettings,
    ConfigError,
    ConnectFailed,
    ConnectionLost,
    JobClient,
    ProtocolFailure,
    RpcError,
    TlsError,
    collapse_exception_group,
    open_client,
)
from joblet.protocol import joblet_pb2 as pb

# Exit statuses (the one table; ``job run --wait`` exits with the job's own status instead).
#: Success.
EXIT_OK = 0
#: A server-side or otherwise unclassified error (INTERNAL, FAILED_PRECONDITION such as "job is
#: not running", RESOURCE_EXHAUSTED, a protocol error).
EXIT_FAILURE = 1
#: A bad command line or local setting: unknown flag, missing command, bad value, missing or
#: invalid certificate file, bad ``--server``; also the server's INVALID_ARGUMENT.
EXIT_USAGE = 2
#: The job does not exist (NOT_FOUND).
EXIT_NOT_FOUND = 3
#: Authentication or authorization failed: PERMISSION_DENIED (e.g. a viewer certificate running a
#: job), UNAUTHENTICATED, a failed TLS handshake or a certificate the server rejected.
EXIT_DENIED = 4
#: The server cannot be reached or went away: connection refused or timed out, connection lost,
#: no answer in time, UNAVAILABLE.
EXIT_UNAVAILABLE = 5
#: Interrupted by Ctrl+C (SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

_RPC_EXIT = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "OUT_OF_RANGE": EXIT_USAGE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "PERMISSION_DENIED": EXIT_DENIED,
    "UNAUTHENTICATED": EXIT_DENIED,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
}

#: Exit status of ``run --wait`` for a STOPPED job (exit code -1): 128 + SIGTERM.
EXIT_JOB_STOPPED = 143
#: Statuses after which a job never changes (CANCELED arrives with scheduled jobs).
TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "STOPPED", "CANCELED"})
#: Polling of the final status after a log stream ended: first and longest interval (seconds).
_POLL_FIRST, _POLL_MAX = 0.02, 1.0
_INT32_MAX = (1 << 31) - 1

#: Every option of rnx that takes a value, for :func:`protect_command` (flags take none).
VALUE_OPTIONS = frozenset(
    {
        "--server",
        "--cert",
        "--key",
        "--ca",
        "--max-cpu",
        "--max-memory",
        "--max-iobps",
        "--cpu-cores",
        "--env",
        "-e",
        "--network",
    }
)


class UsageError(Exception):
    """A command-line value cyclopts cannot check by itself is wrong."""


@attrs.frozen
class GlobalOptions:
    """The options every command gets.

    Attributes:
        client: Where the server is and which certificates to use.
        json: Print JSON instead of the human format.
    """

    client: ClientSettings
    json: bool = False


_GLOBAL = Group("Global options", sort_key=1)
_LIMITS = Group("Job options", sort_key=0)
_Globals = Annotated[GlobalOptions, Parameter(parse=False)]
_Limit = Annotated[
    int, Parameter(group=_LIMITS, validator=validators.Number(gte=0, lte=_INT32_MAX))
]

app = App(
    name="rnx",
    help="Client of the joblet daemon: run isolated, resource-limited jobs on a Linux server.",
    version=joblet.__version__,
)
job_app = App(name="job", help="Run, inspect, stop jobs and follow their output.")
app.command(job_app)


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    server: Annotated[str, Parameter(env_var="JOBLET_SERVER", group=_GLOBAL)] = "localhost:50051",
    cert: Annotated[Path, Parameter(env_var="JOBLET_CERT_PATH", group=_GLOBAL)] = Path(
        "certs/client-cert.pem"
    ),
    key: Annotated[Path, Parameter(env_var="JOBLET_KEY_PATH", group=_GLOBAL)] = Path(
        "certs/client-key.pem"
    ),
    ca: Annotated[Path, Parameter(env_var="JOBLET_CA_PATH", group=_GLOBAL)] = Path(
        "certs/ca-cert.pem"
    ),
    json: Annotated[bool, Parameter(negative="", group=_GLOBAL)] = False,
) -> int:
    """Parse the global options, then run the command.

    Args:
        tokens: The command and its arguments.
        server: Server address, host:port.
        cert: Client certificate (PEM).
        key: Client private key (PEM).
        ca: CA certificate (PEM).
        json: Print machine-readable JSON.
    """
    command, bound, ignored = app.parse_args(tokens, exit_on_error=False, print_error=False)
    options = GlobalOptions(ClientSettings(server=server, cert=cert, key=key, ca=ca), json=json)
    # The only parameters cyclopts leaves to us (parse=False) are the commands' GlobalOptions.
    extra = dict.fromkeys(ignored, options)
    result = command(*bound.args, **bound.kwargs, **extra)
    return result if isinstance(result, int) else EXIT_OK


@job_app.command(name="run")
def job_run(
    command: str,
    /,
    *args: str,
    max_cpu: _Limit = 0,
    max_memory: _Limit = 0,
    max_iobps: _Limit = 0,
    cpu_cores: Annotated[str, Parameter(group=_LIMITS, show_default=False)] = "",
    env: Annotated[
        tuple[str, ...],
        Parameter(
            name=["--env", "-e"],
            group=_LIMITS,
            negative="",
            show_default=False,
            consume_multiple=False,
        ),
    ] = (),
    network: Annotated[
        Literal["host", "none"] | None, Parameter(group=_LIMITS, show_default=False)
    ] = None,
    wait: Annotated[bool, Parameter(negative="", group=_LIMITS)] = False,
    opts: _Globals,
) -> int:
    """Start a job. Everything after COMMAND is passed to it untouched (or put -- first).

    Args:
        command: The program to run on the server.
        args: Its arguments.
        max_cpu: Max CPU in percent of one core (0: the server's default).
        max_memory: Max memory in MB (0: the server's default).
        max_iobps: Max I/O bytes per second (0: unlimited).
        cpu_cores: CPUs to pin the job to, e.g. 0-1 or 0,2.
        env: Environment variable NAME=VALUE for the job (repeatable).
        network: host (shared with the system, the default) or none (loopback only).
        wait: Follow the job's output and exit with the job's exit status (Ctrl+C stops
            waiting, not the job).
    """
    environment: dict[str, str] = {}
    for item in env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"invalid --env value: {item!r} (expected NAME=VALUE)")
        environment[name] = value
    request = pb.RunJobReq(
        command=command,
        args=args,
        maxCPU=max_cpu,
        maxMemory=max_memory,
        maxIOBPS=max_iobps,
        cpuCores=cpu_cores,
        environment=environment,
        network=network or "",
    )

    async def action(client: JobClient) -> int:
        job = await client.run_job(request)
        if not wait:
            _print(output.to_json(job) if opts.json else output.render_run(job))
            return EXIT_OK
        if opts.json:
            await client.stream_logs(job.id, lambda _chunk: None)
        else:
            _note(f"Job started: {job.id}")
            _begin_binary_output()
            await client.stream_logs(job.id, _write_bytes)
        final = await _final_status(client, job.id)
        if opts.json:
            _print(output.to_json(final))
        elif final.status != "COMPLETED":
            _note(output.render_job_end(final))
        return job_exit_status(final)

    return _with_client(opts, action)


@job_app.command(name="status")
def job_status(job_id: str, /, *, opts: _Globals) -> int:
    """Show a job's status, limits and exit code.

    Args:
        job_id: The job's id, or a unique prefix of it.
    """

    async def action(client: JobClient) -> int:
        job = await client.get_job_status(job_id)
        _print(output.to_json(job) if opts.json else output.render_status(job))
        return EXIT_OK

    return _with_client(opts, action)


@job_app.command(name="list")
def job_list(*, opts: _Globals) -> int:
    """List all jobs with their status."""

    async def action(client: JobClient) -> int:
        jobs = await client.list_jobs()
        _print(output.to_json(jobs) if opts.json else output.render_list(jobs))
        return EXIT_OK

    return _with_client(opts, action)


@job_app.command(name="stop")
def job_stop(job_id: str, /, *, opts: _Globals) -> int:
    """Stop a running job: SIGTERM, then SIGKILL after a grace period.

    Args:
        job_id: The job's id, or a unique prefix of it.
    """

    async def action(client: JobClient) -> int:
        res = await client.stop_job(job_id)
        _print(output.to_json(res) if opts.json else output.render_stop(res))
        return EXIT_OK

    return _with_client(opts, action)


@job_app.command(name="delete")
def job_delete(job_id: str, /, *, opts: _Globals) -> int:
    """Delete an ended job with its logs, metrics and metadata.

    Args:
        job_id: The job's id, or a unique prefix of it.
    """

    async def action(client: JobClient) -> int:
        res = await client.delete_job(job_id)
        _print(output.to_json(res) if opts.json else f"Job deleted successfully:\nID: {res.id}")
        return EXIT_OK

    return _with_client(opts, action)


@job_app.command(name="delete-all")
def job_delete_all(*, opts: _Globals) -> int:
    """Delete every job that has ended; running jobs are kept."""

    async def action(client: JobClient) -> int:
        res = await client.delete_all_jobs()
        _print(output.to_json(res) if opts.json else res.message)
        return EXIT_OK

    return _with_client(opts, action)


@job_app.command(name="log")
def job_log(job_id: str, /, *, opts: _Globals) -> int:
    """Stream a job's output (what it wrote so far, then live) until the job ends.

    The bytes are written to stdout unchanged (also with --json). Ctrl+C stops following.

    Args:
        job_id: The job's id, or a unique prefix of it.
    """

    async def action(client: JobClient) -> int:
        if sys.stdout.isatty():
            _note(f"Logs for job {job_id} (Press Ctrl+C to exit if streaming):")
        _begin_binary_output()
        await client.stream_logs(job_id, _write_bytes)
        return EXIT_OK

    return _with_client(opts, action)


@job_app.command(name="metrics")
def job_metrics(
    job_id: str,
    /,
    *,
    chart: Annotated[bool, Parameter(negative="")] = False,
    opts: _Globals,
) -> int:
    """Stream a job's resource usage (CPU, memory, I/O, network) until the job ends.

    Prints every sample taken so far, then live samples. Ctrl+C stops following.

    Args:
        job_id: The job's id, or a unique prefix of it.
        chart: Instead, draw the job's CPU and memory history once it has ended (at once for an
            ended job).
    """
    if chart and opts.json:
        raise UsageError("--chart cannot be combined with --json")

    async def action(client: JobClient) -> int:
        if chart:
            samples: list[pb.JobMetricsSample] = []
            await client.stream_metrics(job_id, samples.append)
            width = shutil.get_terminal_size().columns
            _print(metrics_chart.render_chart(samples, width))
            return EXIT_OK

        def show(sample: pb.JobMetricsSample) -> None:
            _print(output.metrics_to_json(sample) if opts.json else output.render_metrics(sample))

        await client.stream_metrics(job_id, show)
        return EXIT_OK

    return _with_client(opts, action)


def job_exit_status(job: pb.GetJobStatusRes) -> int:
    """The status ``run --wait`` exits with for a job that has ended.

    0 for COMPLETED; the job's exit code when it is 1-255 (128+N when killed by signal N);
    :data:`EXIT_JOB_STOPPED` for STOPPED; otherwise (a failure without a usable code)
    :data:`EXIT_FAILURE`.
    """
    if job.status == "COMPLETED":
        return EXIT_OK
    if job.status == "STOPPED":
        return EXIT_JOB_STOPPED
    if 0 < job.exitCode < 256:
        return job.exitCode
    return EXIT_FAILURE


def exit_status_for(exc: BaseException) -> tuple[int, str | None]:
    """The exit status and the one-line error message (None: print nothing) for ``exc``.

    This is the only place where errors become exit statuses and messages.
    """
    match exc:
        case KeyboardInterrupt():
            return EXIT_INTERRUPTED, None
        case BrokenPipeError():
            return EXIT_OK, None
        case BaseExceptionGroup():
            return exit_status_for(collapse_exception_group(exc))
        case CycloptsError() | UsageError() | ConfigError():
            return EXIT_USAGE, _one_line(str(exc))
        case UnicodeEncodeError():
            # protobuf strings must be UTF-8, and argv may hold any bytes.
            return EXIT_USAGE, f"invalid argument (not UTF-8): {os.fsencode(exc.object)!r}"
        case RpcError(code=code):
            return _RPC_EXIT.get(code, EXIT_FAILURE), str(exc)
        case TlsError():
            return EXIT_DENIED, str(exc)
        case ConnectFailed() | ConnectionLost() | CallTimedOut():
            return EXIT_UNAVAILABLE, str(exc)
        case ProtocolFailure() | ClientError():
            return EXIT_FAILURE, str(exc)
        case _:
            return EXIT_FAILURE, f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"


def protect_command(tokens: Sequence[str]) -> list[str]:
    """Put ``--`` before the command of ``job run``, so cyclopts never parses the job's arguments.

    Scans like the parser: options of rnx (and their values) are skipped; the first word after
    ``job run`` that is not one starts the command. Tokens are returned unchanged when they do
    not invoke ``job run`` or already hold ``--`` before the command.
    """
    expected = ["job", "run"]
    seen: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            break
        if token.startswith("-") and token != "-":
            i += 2 if token in VALUE_OPTIONS else 1
            continue
        if seen == expected:
            return [*tokens[:i], "--", *tokens[i:]]
        seen.append(token)
        if seen != expected[: len(seen)]:
            break
        i += 1
    return list(tokens)


def run(argv: Sequence[str]) -> int:
    """Run ``rnx`` with ``argv`` (without the program name) and return its exit status."""
    try:
        result = app.meta(
            protect_command(argv),
            exit_on_error=False,
            print_error=False,
            result_action="return_value",
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except BaseException as exc:
        return _fail(exc)
    return result if isinstance(result, int) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``rnx`` script."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def _fail(exc: BaseException) -> int:
    status, message = exit_status_for(exc)
    if status == EXIT_INTERRUPTED and sys.stderr.isatty():
        _note("")  # end the line the terminal's ^C is on
    if status == EXIT_OK:  # stdout was closed under us (``| head``): not an error
        _silence_stdout()
    if message is not None:
        if os.environ.get("RNX_DEBUG"):
            traceback.print_exception(exc)
        _note(f"rnx: error: {message}")
    return status


def _with_client(opts: GlobalOptions, action: Callable[[JobClient], Awaitable[int]]) -> int:
    async def session() -> int:
        async with open_client(opts.client) as client:
            return await action(client)

    return trio.run(session)


async def _final_status(client: JobClient, job_id: str) -> pb.GetJobStatusRes:
    """The job's status once it has ended (its log stream may end a moment before)."""
    delay = _POLL_FIRST
    while True:
        job = await client.get_job_status(job_id)
        if job.status in TERMINAL_STATUSES:
            return job
        await trio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


def _print(text: str) -> None:
    if text:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _note(text: str) -> None:
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except OSError:
        pass  # nowhere left to report to


def _begin_binary_output() -> None:
    sys.stdout.flush()


def _write_bytes(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
