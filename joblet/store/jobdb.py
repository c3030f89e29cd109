"""Durable job metadata: an embedded SQLite database (stdlib ``sqlite3``, WAL).

One row per job, keyed by its id, holding the latest :class:`~joblet.core.model.JobInfo` the daemon
saved. The calls are synchronous and meant for a worker thread: the disk writer
(:class:`joblet.actors.diskwriter.DiskWriter`) saves rows in batches off the event loop, and
:func:`joblet.actors.root.open_node` loads them once at start-up.

WAL with ``synchronous=NORMAL``: a committed transaction survives a crash of the daemon (it is in
the WAL file, which the kernel holds), and a power loss can lose at most the last transactions,
never corrupt the database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cattrs

from joblet.core.model import JobInfo, JobSpec, JobStatus

#: Bumped when the schema changes; a database with a newer version is refused.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    status     TEXT NOT NULL,
    start_time REAL,
    end_time   REAL,
    exit_code  INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    spec       TEXT NOT NULL
)
"""

#: Jobs whose row is deleted and whose files may not be yet: the row goes in the same transaction
#: as its id comes here, and the id leaves once the files are gone, so a crash in between leaves
#: a note to finish the deletion at the next start (never files without a row and no note).
_DELETING_SCHEMA = "CREATE TABLE IF NOT EXISTS deleting (id TEXT PRIMARY KEY)"

_UPSERT = """
INSERT INTO jobs (id, status, start_time, end_time, exit_code, reason, node_id, spec)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status,
    start_time = excluded.start_time,
    end_time = excluded.end_time,
    exit_code = excluded.exit_code,
    reason = excluded.reason,
    node_id = excluded.node_id,
    spec = excluded.spec
"""

_converter = cattrs.Converter()


class JobDBError(Exception):
    """The job database cannot be used (unreadable, or written by a newer joblet)."""


def encode_spec(spec: JobSpec) -> str:
    """A job spec as the JSON text stored in the database."""
    raw = _converter.unstructure(spec)
    raw["env"] = dict(spec.env)
    return json.dumps(raw, separators=(",", ":"), sort_keys=True)


def decode_spec(text: str) -> JobSpec:
    """The job spec stored as ``text`` by :func:`encode_spec`."""
    raw: dict[str, Any] = json.loads(text)
    raw["args"] = tuple(raw.get("args", ()))
    return _converter.structure(raw, JobSpec)


class JobDB:
    """The job table in ``path`` (created if missing).

    Not thread-safe by itself: callers serialise access (the disk writer writes from one worker
    thread at a time); an internal lock guards against misuse.

    Args:
        path: The database file, e.g. ``<state>/jobs.db``.

    Raises:
        JobDBError: The file is not a usable joblet database.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Ids of the rows the last :meth:`load` could not decode.
        self.skipped: list[str] = []
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobDBError(
                    f"job database {path} has schema version {version}; "
                    f"this joblet knows version {SCHEMA_VERSION}"
                )
            self._db.execute(_SCHEMA)
            self._db.execute(_DELETING_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise JobDBError(f"job database {path} cannot be opened: {e}") from e

    def save(self, infos: Sequence[JobInfo]) -> None:
        """Insert or update these jobs in one transaction."""
        rows = [
            (
                i.id,
                i.status.value,
                i.start_time,
                i.end_time,
                i.exit_code,
                i.reason,
                i.node_id,
                encode_spec(i.spec),
            )
            for i in infos
        ]
        with self._lock, self._transaction():
            self._db.executemany(_UPSERT, rows)

    def delete(self, job_ids: Iterable[str], *, files_of: Iterable[str] = ()) -> None:
        """Remove these jobs (missing ids are not an error), in one transaction.

        Args:
            job_ids: The jobs whose rows go.
            files_of: Jobs whose files are deleted next: noted in the same transaction (see
                :meth:`deleting`) until :meth:`files_deleted` says they are gone.
        """
        ids = [(j,) for j in job_ids]
        notes = [(j,) for j in files_of]
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM jobs WHERE id = ?", ids)
            self._db.executemany("INSERT OR IGNORE INTO deleting (id) VALUES (?)", notes)

    def deleting(self) -> list[str]:
        """Jobs whose rows were deleted and whose files may still be there (a crash came
        between)."""
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT id FROM deleting ORDER BY id")]

    def files_deleted(self, job_ids: Iterable[str]) -> None:
        """These jobs' files are gone: drop their notes (see :meth:`delete`)."""
        ids = [(j,) for j in job_ids]
        with self._lock, self._transaction():
            self._db.executemany("DELETE FROM deleting WHERE id = ?", ids)

    def load(self) -> list[JobInfo]:
        """Every job, in the order they were first saved.

        A row that cannot be decoded (damaged by hand, say) is skipped rather than stopping the
        daemon; :attr:`skipped` counts them.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT id, status, start_time, end_time, exit_code, reason, node_id, spec "
                "FROM jobs ORDER BY seq"
            ).fetchall()
        jobs: list[JobInfo] = []
        self.skipped = []
        for job_id, status, start, end, code, reason, node_id, spec in rows:
            try:
                jobs.append(
                    JobInfo(
                        id=job_id,
                        spec=decode_spec(spec),
                        status=JobStatus(status),
                        start_time=start,
                        end_time=end,
                        exit_code=code,
                        reason=reason,
                        node_id=node_id,
                    )
                )
            except (ValueError, TypeError, KeyError, cattrs.BaseValidationError):
                self.skipped.append(job_id)
        return jobs

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed into the main file)."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` on error (the connection autocommits)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
