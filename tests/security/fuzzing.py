"""The fuzzing run's seed, its size, and what it sent (for the summary at the end of the session).

Environment:

- ``JOBLET_FUZZ_SEED``: replay a run (its seed is in the report header and in every failure);
  otherwise a random seed is picked when the session starts.
- ``JOBLET_FUZZ_PROFILE``: ``ci`` (default: the whole file in about a minute) or ``deep``
  (thousands of examples per RPC, minutes each);
- ``JOBLET_FUZZ_EXAMPLES``: examples per RPC instead of the profile's;
- ``JOBLET_FUZZ_VERBOSE=1``: the summary also shows each RPC's commonest error messages.

A replay sends the same requests in the same order, but against a new daemon: job ids differ, so
a failure that depends on a particular job's state may need the request from the failure message.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
from hypothesis import HealthCheck, settings

SEED_ENV = "JOBLET_FUZZ_SEED"
PROFILE_ENV = "JOBLET_FUZZ_PROFILE"
EXAMPLES_ENV = "JOBLET_FUZZ_EXAMPLES"
VERBOSE_ENV = "JOBLET_FUZZ_VERBOSE"


def _seed() -> int:
    text = os.environ.get(SEED_ENV, "").strip()
    if text:
        return int(text, 0)
    return random.SystemRandom().randrange(1 << 32)


#: This session's seed.
SEED = _seed()


@attrs.frozen
class Profile:
    """How much to fuzz.

    Attributes:
        name: As given in ``JOBLET_FUZZ_PROFILE``.
        examples: Hypothesis examples per RPC (the RunJob tests get twice as many).
        seconds: Wall time per RPC; the examples left after it are not sent.
    """

    name: str
    examples: int
    seconds: float


PROFILES = {
    "ci": Profile("ci", examples=300, seconds=8.0),
    "deep": Profile("deep", examples=3000, seconds=600.0),
}


def _profile() -> Profile:
    name = os.environ.get(PROFILE_ENV, "ci").strip() or "ci"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: expected one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    examples = os.environ.get(EXAMPLES_ENV, "").strip()
    return attrs.evolve(profile, examples=int(examples)) if examples else profile


PROFILE = _profile()


def fuzz_settings(scale: int = 1) -> settings:
    """Hypothesis settings of the profile (``scale`` times its examples).

    No deadline (a live daemon's latency is not the property under test), no example database
    (replay goes by the seed), one failure reported per test (the first: shrinking a second one
    costs real calls too).
    """
    return settings(
        max_examples=PROFILE.examples * scale,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=False,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@attrs.define
class RpcStats:
    """What one RPC was sent and answered.

    Attributes:
        sent: Requests that reached the wire.
        client_rejected: Requests protobuf refused at the client (then sent as raw bytes).
        raw: Requests sent as hand-made wire format (including the client-rejected ones).
        skipped: Examples not sent (over the time budget, or a command that names a real
            program with arguments that are not known to be harmless).
        seconds: Time spent in calls.
        codes: Answers by status code name.
        messages: Error answers by code and message (digits masked, cut short).
    """

    sent: int = 0
    client_rejected: int = 0
    raw: int = 0
    skipped: int = 0
    seconds: float = 0.0
    codes: Counter[str] = attrs.field(factory=Counter)
    messages: Counter[str] = attrs.field(factory=Counter)

    def answered(self, code: str, details: str) -> None:
        """Count one answer."""
        self.codes[code] += 1
        if details:
            self.messages[f"{code} {re.sub(r'[0-9]+', '#', details)[:70]}"] += 1

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the block's wall time into :attr:`seconds`."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds += time.monotonic() - start


#: Per RPC (``Service/Method``), filled by the tests, printed at the end of the session.
STATS: dict[str, RpcStats] = {}


#: Logs of daemons whose fuzzing failed, kept for the summary.
KEPT_LOGS: list[Path] = []


def stats_for(rpc: str) -> RpcStats:
    """The stats of one RPC (created on first use)."""
    return STATS.setdefault(rpc, RpcStats())


def summary_lines() -> list[str]:
    """The volume table: one line per RPC, and a total."""
    if not STATS:
        return []
    lines = [
        f"seed {SEED} (replay: {SEED_ENV}={SEED}), profile {PROFILE.name}",
        f"{'rpc':<42} {'sent':>6} {'raw':>5} {'c-rej':>5} {'skip':>5} {'secs':>7}  codes",
    ]
    total = RpcStats()
    for rpc, s in sorted(STATS.items()):
        codes = " ".join(f"{c}={n}" for c, n in s.codes.most_common())
        lines.append(
            f"{rpc:<42} {s.sent:>6} {s.raw:>5} {s.client_rejected:>5} {s.skipped:>5}"
            f" {s.seconds:>7.1f}  {codes}"
        )
        if os.environ.get(VERBOSE_ENV):
            lines += [f"    {n:>5}  {m}" for m, n in s.messages.most_common(6)]
        total.sent += s.sent
        total.raw += s.raw
        total.client_rejected += s.client_rejected
        total.skipped += s.skipped
        total.seconds += s.seconds
    lines.append(
        f"{'total':<42} {total.sent:>6} {total.raw:>5} {total.client_rejected:>5}"
        f" {total.skipped:>5} {total.seconds:>7.1f}"
    )
    lines += [f"daemon log kept: {path}" for path in KEPT_LOGS]
    return lines
