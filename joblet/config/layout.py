"""Where everything lives under the state directory: the one place that spells those paths.

::

    <state>/
        jobs/                  job roots while jobs run (joblet.actors.job)
        logs/<job id>/         job output and its index (joblet.store.logfiles)
        metrics/<job id>       resource samples (joblet.store.metricfiles)
        jobs.db                job records (joblet.store.jobdb)
        node_id                this installation's node id
        joblet.lock            held by the running daemon, so a second one on the same state fails
        run/persist-grpc.sock  the Persist Service's socket (persist.server.grpc_socket)
        certs/                 the CA and certificates ``joblet serve`` creates on first start

Pure path arithmetic: nothing here touches the disk.
"""

from __future__ import annotations

from pathlib import Path

import attrs

#: The daemon's sockets, relative to the state directory.
RUN_DIR = "run"
#: The default of ``persist.server.grpc_socket``, relative to the state directory.
DEFAULT_PERSIST_SOCKET = f"{RUN_DIR}/persist-grpc.sock"
#: The certificate directory, relative to the state directory (``security``'s defaults are in it).
CERTS_DIR = "certs"


@attrs.frozen
class StateLayout:
    """The paths under one state directory.

    Attributes:
        root: The state directory (``stateDir``).
        grpc_socket: ``persist.server.grpc_socket`` as configured: relative to ``root`` unless
            absolute (see :attr:`persist_socket`).
    """

    root: Path
    grpc_socket: str = DEFAULT_PERSIST_SOCKET

    @property
    def persist_socket(self) -> Path:
        """The Persist Service's Unix socket."""
        return self.root / self.grpc_socket

    def under(self, configured: str | Path) -> Path:
        """A configured path (``security.caCert``): under the state directory unless absolute."""
        return self.root / configured

    @property
    def jobs_dir(self) -> Path:
        """Each running job's root directory is ``jobs_dir / <job id>``."""
        return self.root / "jobs"

    @property
    def logs_dir(self) -> Path:
        """Each job's log directory is ``logs_dir / <job id>``."""
        return self.root / "logs"

    @property
    def metrics_dir(self) -> Path:
        """Where the jobs' metrics files are."""
        return self.root / "metrics"

    @property
    def jobs_db(self) -> Path:
        """The job records' database."""
        return self.root / "jobs.db"

    @property
    def node_id(self) -> Path:
        """The file that keeps this installation's node id."""
        return self.root / "node_id"

    @property
    def lock(self) -> Path:
        """The daemon's lock file: one daemon per state directory."""
        return self.root / "joblet.lock"

    @property
    def run_dir(self) -> Path:
        """Sockets of the running daemon (the Persist Service's, by default)."""
        return self.root / RUN_DIR

    @property
    def certs_dir(self) -> Path:
        """The certificates ``joblet serve`` creates when the directory is missing."""
        return self.root / CERTS_DIR
