# joblet tasks. Every recipe bootstraps .venv itself (see `setup`).
set shell := ["bash", "-euo", "pipefail", "-c"]
# Recipe arguments reach the commands as "$@", with their quoting intact
# (`just rnx job run sh -c 'echo a; echo b'` passes one argument after -c).
set positional-arguments := true

venv := justfile_directory() / ".venv"
py := venv / "bin/python"

# Create .venv and install joblet with its dev tools (idempotent; reinstalls when pyproject.toml changes).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    cd "{{justfile_directory()}}"
    if [ ! -x "{{py}}" ]; then
        base=$(python3 -c 'import sys; print(sys.base_prefix)')/bin/python3
        [ -x "$base" ] || base=python3
        "$base" -m venv "{{venv}}"
    fi
    stamp="{{venv}}/.installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "{{py}}" -m pip install -q --upgrade pip
        "{{py}}" -m pip install -q -e '.[dev]'
        touch "$stamp"
    fi

# Start the daemon on the embedded default (state in ./state, port 50051).
serve *ARGS: setup
    "{{py}}" -m joblet.main serve "$@"

# Run the test suite (real processes, real cgroups: run as root).
test *ARGS: setup
    "{{py}}" -m pytest "$@"

# Run the cgroup v2 tests inside a real cgroup v2 kernel (qemu, host root shared read-only).
test-cgroup2 *ARGS: setup
    "{{py}}" -m tests.vm.run_v2 "$@"

# Lint and type-check.
lint: setup
    "{{venv}}/bin/ruff" check joblet cli tools tests benchmarks
    "{{venv}}/bin/ruff" format --check joblet cli tools tests benchmarks
    "{{venv}}/bin/mypy" joblet cli tools tests benchmarks

# Format the code.
fmt: setup
    "{{venv}}/bin/ruff" format joblet cli tools tests benchmarks
    "{{venv}}/bin/ruff" check --fix joblet cli tools tests benchmarks

# Benchmarks: figures printed next to baselines measured in the same run.
bench *ARGS: setup
    "{{py}}" -m benchmarks.run "$@"

# Regenerate the protobuf/purerpc code from proto/ (output is committed).
proto: setup
    "{{py}}" -m tools.gen_proto

# Run rnx against the daemon started by `just serve` (uses ./state/certs).
rnx *ARGS: setup
    JOBLET_CA_PATH="{{justfile_directory()}}/state/certs/ca-cert.pem" \
    JOBLET_CERT_PATH="{{justfile_directory()}}/state/certs/admin-client-cert.pem" \
    JOBLET_KEY_PATH="{{justfile_directory()}}/state/certs/admin-client-key.pem" \
    "{{venv}}/bin/rnx" "$@"
