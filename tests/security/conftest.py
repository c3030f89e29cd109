"""The fuzzing seed in the report header, and what was sent in the terminal summary."""

from __future__ import annotations

import pytest

from tests.security import fuzzing


def pytest_report_header(config: pytest.Config) -> str:
    """The seed, so any run can be replayed."""
    return (
        f"joblet fuzz seed: {fuzzing.SEED} (replay: {fuzzing.SEED_ENV}={fuzzing.SEED}), "
        f"profile: {fuzzing.PROFILE.name}"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzzing volume per RPC (requests, seconds, answers), when fuzzing ran."""
    lines = fuzzing.summary_lines()
    if lines:
        terminalreporter.section("API fuzzing")
        for line in lines:
            terminalreporter.write_line(line)
