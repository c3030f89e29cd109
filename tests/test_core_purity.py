"""The core makes decisions only: importing any of its modules loads no I/O library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "joblet" / "core"
MODULES = sorted(
    f"joblet.core.{p.stem}" if p.stem != "__init__" else "joblet.core" for p in CORE.glob("*.py")
)
#: What a core module must never pull in, directly or through what it imports.
FORBIDDEN = ("trio", "anyio", "purerpc", "sqlite3", "_sqlite3", "h2", "grpc", "cattrs", "yaml")

CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
bad = sorted(
    name for name in sys.modules
    if name.split(".")[0] in sys.argv[2].split(",")
    or (name.startswith("joblet.") and not name.startswith("joblet.core") and name != "joblet")
)
print(",".join(bad))
"""


def test_every_core_module_is_checked() -> None:
    assert "joblet.core.lifecycle" in MODULES
    assert len(MODULES) >= 6


@pytest.mark.parametrize("module", MODULES)
def test_core_module_loads_no_io_library(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK, module, ",".join(FORBIDDEN)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert out == "", f"{module} loads {out}"
