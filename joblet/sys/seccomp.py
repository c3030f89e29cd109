"""Seccomp profiles: Docker's JSON format, compiled by libseccomp into the program stage 1 installs.

The daemon compiles the configured profile once, at start-up (:func:`load_profile`), and hands the
classic BPF program (:attr:`SeccompProfile.bpf`) to every job start; stage 1 installs it with
:func:`joblet.sys._filter.install` as the last step before the job's command is exec'd.

The setting is ``"default"`` (joblet's own profile, ``seccomp_default.json`` beside this module),
``"off"`` (no filter) or the path of a profile in Docker's JSON format, so that operators can
reuse the profiles they have. The format's fields and their meaning follow Docker's
``profiles/seccomp`` and runc: ``defaultAction`` (with ``defaultErrnoRet``), ``architectures`` or
``archMap``, and ``syscalls[]`` rules with ``names`` (or the legacy ``name``), ``action``,
``errnoRet``, ``args`` and the ``includes``/``excludes`` filters on ``caps``, ``arches`` and
``minKernel``. What joblet cannot honour is refused, never silently dropped: the actions that need
a supervisor (``SCMP_ACT_NOTIFY``, ``SCMP_ACT_TRACE``), ``flags`` and ``listenerPath``, and any key
the format does not have (a misspelt ``excludes`` would otherwise widen the rule it was meant to
narrow).

A joblet job has no capabilities (an unprivileged uid with no_new_privs), so a rule that
``includes`` capabilities never applies and one that ``excludes`` capabilities always does.
Syscall names libseccomp does not know, or that are no system call on any architecture of the
filter, are skipped as runc skips them, and listed in :attr:`SeccompProfile.skipped`.

System calls of an ABI the profile does not list (i386 through ``int 0x80``, x32 on x86_64) fail
with EPERM: libseccomp's bad-architecture action is set to ``ERRNO(EPERM)``, and an x86_64 filter
without x32 sends x32 system call numbers to that action too.

The default profile has the semantics of Docker's default for a process without capabilities:
anything not listed fails with EPERM, and the kernel attack surface a job never needs (keys, bpf,
perf, io_uring, mounts, modules, namespaces, clocks, ...) is not listed. Two choices differ from a
blanket deny and are documented in the profile itself: ``ptrace`` and ``process_vm_readv``/
``process_vm_writev`` are allowed, because the job's PID namespace leaves no process outside the
job visible or reachable, and strace or gdb inside a CI job are legitimate; ``clone3`` fails with
ENOSYS, because its flags sit behind a pointer a filter cannot read, and ENOSYS makes glibc fall
back to ``clone``, whose flags the filter checks (Docker's choice).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pyseccomp

#: The ``isolation.seccomp`` setting that selects joblet's own profile.
DEFAULT = "default"
#: The ``isolation.seccomp`` setting for no filter at all.
OFF = "off"
#: joblet's own profile, in Docker's format.
DEFAULT_PROFILE_PATH = Path(__file__).with_name("seccomp_default.json")

#: The kernel's limit on a classic BPF program (BPF_MAXINSNS); a longer one cannot be installed.
MAX_INSTRUCTIONS = 4096
#: Size of one ``struct sock_filter`` (u16 code, u8 jt, u8 jf, u32 k).
INSTRUCTION_SIZE = 8
#: Largest errno a system call can return (the kernel's MAX_ERRNO): above it, -errno is a value.
MAX_ERRNO = 4095
#: A system call's arguments (``struct seccomp_data.args``).
MAX_ARGS = 6

#: libseccomp's binary-tree layout (SCMP_FLTATR_CTL_OPTIMIZE = 2): a syscall is found in
#: O(log n) comparisons instead of walking the whole allow list.
_OPTIMIZE_BINARY_TREE = 2

_ACTIONS: dict[str, int] = {
    "SCMP_ACT_ALLOW": pyseccomp.ALLOW,
    "SCMP_ACT_KILL": pyseccomp.KILL,
    "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
    "SCMP_ACT_TRAP": pyseccomp.TRAP,
    "SCMP_ACT_LOG": pyseccomp.LOG,
}
_ERRNO_ACTION = "SCMP_ACT_ERRNO"
_REFUSED_ACTIONS = {
    "SCMP_ACT_NOTIFY": "needs a supervisor on the notification fd, which joblet does not run",
    "SCMP_ACT_TRACE": "needs a ptrace supervisor, which joblet does not run",
}

_OPS = {
    "SCMP_CMP_NE": pyseccomp.NE,
    "SCMP_CMP_LT": pyseccomp.LT,
    "SCMP_CMP_LE": pyseccomp.LE,
    "SCMP_CMP_EQ": pyseccomp.EQ,
    "SCMP_CMP_GE": pyseccomp.GE,
    "SCMP_CMP_GT": pyseccomp.GT,
    "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ,
}

_ARCHES: dict[str, int] = {
    "SCMP_ARCH_X86": pyseccomp.Arch.X86,
    "SCMP_ARCH_X86_64": pyseccomp.Arch.X86_64,
    "SCMP_ARCH_X32": pyseccomp.Arch.X32,
    "SCMP_ARCH_ARM": pyseccomp.Arch.ARM,
    "SCMP_ARCH_AARCH64": pyseccomp.Arch.AARCH64,
    "SCMP_ARCH_MIPS": pyseccomp.Arch.MIPS,
    "SCMP_ARCH_MIPS64": pyseccomp.Arch.MIPS64,
    "SCMP_ARCH_MIPS64N32": pyseccomp.Arch.MIPS64N32,
    "SCMP_ARCH_MIPSEL": pyseccomp.Arch.MIPSEL,
    "SCMP_ARCH_MIPSEL64": pyseccomp.Arch.MIPSEL64,
    "SCMP_ARCH_MIPSEL64N32": pyseccomp.Arch.MIPSEL64N32,
    "SCMP_ARCH_PPC": pyseccomp.Arch.PPC,
    "SCMP_ARCH_PPC64": pyseccomp.Arch.PPC64,
    "SCMP_ARCH_PPC64LE": pyseccomp.Arch.PPC64LE,
    "SCMP_ARCH_S390": pyseccomp.Arch.S390,
    "SCMP_ARCH_S390X": pyseccomp.Arch.S390X,
    "SCMP_ARCH_PARISC": pyseccomp.Arch.PARISC,
    "SCMP_ARCH_PARISC64": pyseccomp.Arch.PARISC64,
    "SCMP_ARCH_RISCV64": pyseccomp.Arch.RISCV64,
}
_ARCH_NAMES = {token: name for name, token in _ARCHES.items()}

#: The names ``includes.arches``/``excludes.arches`` use: Go's GOARCH of the host, as in Docker.
_GOARCH = {
    pyseccomp.Arch.X86_64: "amd64",
    pyseccomp.Arch.X86: "386",
    pyseccomp.Arch.AARCH64: "arm64",
    pyseccomp.Arch.ARM: "arm",
    pyseccomp.Arch.PPC64LE: "ppc64le",
    pyseccomp.Arch.PPC64: "ppc64",
    pyseccomp.Arch.S390X: "s390x",
    pyseccomp.Arch.S390: "s390",
    pyseccomp.Arch.RISCV64: "riscv64",
    pyseccomp.Arch.MIPS: "mips",
    pyseccomp.Arch.MIPSEL: "mipsle",
    pyseccomp.Arch.MIPS64: "mips64",
    pyseccomp.Arch.MIPSEL64: "mips64le",
}

# Keys of Docker's format (moby profiles/seccomp, the OCI runtime spec); "comment" is free text.
_PROFILE_KEYS = frozenset(
    {
        "defaultAction",
        "defaultErrnoRet",
        "architectures",
        "archMap",
        "syscalls",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "comment",
    }
)
_ARCHMAP_KEYS = frozenset({"architecture", "subArchitectures"})
_RULE_KEYS = frozenset(
    {"names", "name", "action", "errnoRet", "args", "comment", "includes", "excludes"}
)
_FILTER_KEYS = frozenset({"caps", "arches", "minKernel"})
_ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})

_KERNEL_VERSION = re.compile(r"(\d+)\.(\d+)")


class SeccompProfileError(ValueError):
    """A profile cannot be read or compiled; the message names the file and the problem.

    Attributes:
        source: The profile's file (or ``"default"``).
        problem: What is wrong with it.
    """

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"seccomp profile {source}: {problem}")
        self.source = source
        self.problem = problem


def _describe_bpf(bpf: bytes) -> str:
    return f"<{len(bpf) // INSTRUCTION_SIZE} instructions>"


@attrs.frozen
class SeccompProfile:
    """A compiled profile, ready for stage 1.

    Attributes:
        name: ``"default"``, ``"off"``, or the profile's path as configured.
        bpf: The classic BPF program, an array of ``struct sock_filter`` as ``PR_SET_SECCOMP``
            takes it; empty for ``"off"``.
        architectures: The ABIs the filter lets through (libseccomp's ``SCMP_ARCH_*`` names),
            the native one first; system calls of any other ABI fail with EPERM.
        skipped: Syscall names of the profile's applicable rules that libseccomp does not know,
            or that are no system call on any of those architectures, sorted.
    """

    name: str
    bpf: bytes = attrs.field(repr=_describe_bpf)
    architectures: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def instructions(self) -> int:
        """Length of the program in BPF instructions (0 for ``"off"``)."""
        return len(self.bpf) // INSTRUCTION_SIZE

    @property
    def enabled(self) -> bool:
        """Whether there is a filter to install at all."""
        return bool(self.bpf)


def load_profile(setting: str) -> SeccompProfile:
    """Read and compile the profile an ``isolation.seccomp`` setting names.

    Args:
        setting: ``"default"``, ``"off"``, or the path of a profile in Docker's JSON format.

    Returns:
        The compiled profile, named after the setting.

    Raises:
        SeccompProfileError: The file cannot be read, is not JSON, is not a valid profile, or
            asks for what joblet cannot honour.
    """
    if setting == OFF:
        return SeccompProfile(name=OFF, bpf=b"")
    path = DEFAULT_PROFILE_PATH if setting == DEFAULT else Path(setting)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SeccompProfileError(setting, f"cannot read it: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SeccompProfileError(setting, f"not valid JSON: {exc}") from exc
    return compile_profile(document, name=setting)


def compile_profile(document: object, *, name: str) -> SeccompProfile:
    """Compile a profile already parsed from JSON for the running host.

    The host facts the format refers to are this process's: the native architecture (as
    libseccomp sees it) and the running kernel's version.

    Args:
        document: The parsed JSON document.
        name: What the profile is called (in errors and in the result).

    Returns:
        The compiled profile.

    Raises:
        SeccompProfileError: The document is not a valid profile, or asks for what joblet
            cannot honour.
    """
    return _Compiler(name).compile(document)


def running_kernel() -> tuple[int, int]:
    """The running kernel's version as (major, minor), from ``uname -r``."""
    match = _KERNEL_VERSION.match(os.uname().release)
    if match is None:  # pragma: no cover - every Linux release string starts with it
        raise RuntimeError(f"cannot parse the kernel release {os.uname().release!r}")
    return int(match[1]), int(match[2])


class _Compiler:
    """One compilation: validates the document while it feeds libseccomp."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.native: int = pyseccomp.system_arch()
        self.goarch = _GOARCH.get(self.native, "")
        self.kernel = running_kernel()

    def error(self, problem: str) -> SeccompProfileError:
        return SeccompProfileError(self.name, problem)

    def compile(self, document: object) -> SeccompProfile:
        profile = self.mapping(document, "the profile", _PROFILE_KEYS)
        for key in ("flags", "listenerPath", "listenerMetadata"):
            if profile.get(key):
                raise self.error(f"{key!r} is not supported (joblet installs plain filters)")
        if "defaultAction" not in profile:
            raise self.error("'defaultAction' is missing")
        default = self.action(
            profile["defaultAction"], profile.get("defaultErrnoRet"), "defaultAction"
        )
        arches = self.architectures(profile)
        rules = profile.get("syscalls")
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise self.error("'syscalls' must be a list")

        filt = pyseccomp.SyscallFilter(default)
        filt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.ERRNO(errno.EPERM))
        filt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, _OPTIMIZE_BINARY_TREE)
        for arch in arches[1:]:
            filt.add_arch(arch)
        skipped: set[str] = set()
        for number, rule in enumerate(rules):
            self.add_rule(filt, default, arches, rule, f"syscalls[{number}]", skipped)

        bpf = _export_bpf(filt)
        if len(bpf) // INSTRUCTION_SIZE > MAX_INSTRUCTIONS:
            raise self.error(
                f"compiles to {len(bpf) // INSTRUCTION_SIZE} BPF instructions, more than the"
                f" kernel's limit of {MAX_INSTRUCTIONS}"
            )
        return SeccompProfile(
            name=self.name,
            bpf=bpf,
            architectures=tuple(_ARCH_NAMES.get(a, hex(a)) for a in arches),
            skipped=tuple(sorted(skipped)),
        )

    # -- the document's parts ------------------------------------------------------------------

    def mapping(self, value: object, where: str, keys: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"{where} must be a JSON object")
        unknown = sorted(set(value) - keys)
        if unknown:
            raise self.error(f"{where}: unknown key {unknown[0]!r}")
        return value

    def strings(self, value: object, where: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{where} must be a list of strings")
        return value

    def integer(self, value: object, where: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(f"{where} must be an integer from {low} to {high}, not {value!r}")
        return value

    def action(self, value: object, errno_ret: object, where: str) -> int:
        if not isinstance(value, str):
            raise self.error(f"{where} must be a string")
        if value in _REFUSED_ACTIONS:
            raise self.error(f"{where} {value} is not supported: it {_REFUSED_ACTIONS[value]}")
        if value == _ERRNO_ACTION:
            code = errno.EPERM
            if errno_ret is not None:
                code = self.integer(errno_ret, f"{where}'s errno", 0, MAX_ERRNO)
            return int(pyseccomp.ERRNO(code))
        if value not in _ACTIONS:
            raise self.error(f"{where}: unknown action {value!r}")
        if errno_ret is not None:
            raise self.error(f"{where}: an errno is only meaningful with {_ERRNO_ACTION}")
        return _ACTIONS[value]

    def arch(self, value: str, where: str) -> int:
        if value not in _ARCHES:
            raise self.error(f"{where}: unknown architecture {value!r}")
        return _ARCHES[value]

    def architectures(self, profile: Mapping[str, Any]) -> list[int]:
        """The filter's ABIs, native first (libseccomp always has the native one)."""
        listed = self.strings(profile.get("architectures"), "'architectures'")
        archmap = profile.get("archMap")
        if listed and archmap:
            raise self.error("use either 'architectures' or 'archMap', not both")
        arches = [self.arch(a, "'architectures'") for a in listed]
        if archmap is not None:
            if not isinstance(archmap, list):
                raise self.error("'archMap' must be a list")
            for number, entry in enumerate(archmap):
                where = f"archMap[{number}]"
                entry = self.mapping(entry, where, _ARCHMAP_KEYS)
                main = entry.get("architecture")
                if not isinstance(main, str):
                    raise self.error(f"{where}: 'architecture' must be a string")
                subs = self.strings(entry.get("subArchitectures"), f"{where}.subArchitectures")
                tokens = [self.arch(a, where) for a in (main, *subs)]
                # As in Docker: only the entry of the host's own architecture counts.
                if tokens[0] == self.native:
                    arches.extend(tokens)
        result = [self.native]
        for arch in arches:
            if arch not in result:
                result.append(arch)
        return result

    def applies(self, rule: Mapping[str, Any], where: str) -> bool:
        """Docker's ``includes``/``excludes`` for this host and a job without capabilities."""
        for key in ("excludes", "includes"):
            if key not in rule:
                continue
            cond = self.mapping(rule[key], f"{where}.{key}", _FILTER_KEYS)
            caps = self.strings(cond.get("caps"), f"{where}.{key}.caps")
            arches = self.strings(cond.get("arches"), f"{where}.{key}.arches")
            min_kernel = cond.get("minKernel")
            at_least = (
                None
                if min_kernel in (None, "")
                else self.kernel >= self.kernel_version(min_kernel, f"{where}.{key}.minKernel")
            )
            if key == "excludes":
                # A job holds no capability, so excluding capabilities never excludes it.
                if self.goarch in arches or at_least is True:
                    return False
            else:
                # A job holds no capability, so a rule that needs one never applies.
                if caps or (arches and self.goarch not in arches) or at_least is False:
                    return False
        return True

    def kernel_version(self, value: object, where: str) -> tuple[int, int]:
        if isinstance(value, str):
            parts = value.split(".")
            if len(parts) == 2 and all(p.isdigit() and int(p) < 256 for p in parts):
                version = (int(parts[0]), int(parts[1]))
                if version != (0, 0):
                    return version
        raise self.error(f'{where} must be "<kernel>.<major>", not {value!r}')

    def args(self, value: object, where: str) -> list[tuple[int, pyseccomp.Arg]]:
        """The conditions, each with the index of the argument it compares."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"{where} must be a list")
        conditions = []
        for number, raw in enumerate(value):
            at = f"{where}[{number}]"
            arg = self.mapping(raw, at, _ARG_KEYS)
            for key in ("index", "value", "op"):
                if key not in arg:
                    raise self.error(f"{at}: {key!r} is missing")
            index = self.integer(arg["index"], f"{at}.index", 0, MAX_ARGS - 1)
            datum = self.integer(arg["value"], f"{at}.value", 0, 2**64 - 1)
            datum_two = self.integer(arg.get("valueTwo", 0), f"{at}.valueTwo", 0, 2**64 - 1)
            op = arg["op"]
            if op not in _OPS:
                raise self.error(f"{at}: unknown op {op!r}")
            # Docker's order is libseccomp's: for MASKED_EQ, value is the mask, valueTwo the datum.
            conditions.append((index, pyseccomp.Arg(index, _OPS[op], datum, datum_two)))
        return conditions

    def add_rule(
        self,
        filt: pyseccomp.SyscallFilter,
        default: int,
        arches: Sequence[int],
        raw: object,
        where: str,
        skipped: set[str],
    ) -> None:
        rule = self.mapping(raw, where, _RULE_KEYS)
        names = self.strings(rule.get("names"), f"{where}.names")
        if "name" in rule:
            if names:
                raise self.error(f"{where}: use either 'name' or 'names', not both")
            if not isinstance(rule["name"], str):
                raise self.error(f"{where}.name must be a string")
            names = [rule["name"]]
        if not names:
            raise self.error(f"{where}: no syscall names")
        if "action" not in rule:
            raise self.error(f"{where}: 'action' is missing")
        action = self.action(rule["action"], rule.get("errnoRet"), f"{where}.action")
        conditions = self.args(rule.get("args"), f"{where}.args")
        if not self.applies(rule, where):
            return
        # libseccomp refuses a rule with the default action; it would change nothing (runc).
        if action == default:
            return
        # One rule ANDs its conditions; conditions on the same argument can only be ORed, by
        # one rule each (runc's reading of the format, which Docker's personality rules rely on).
        indexes = [index for index, _ in conditions]
        if len(set(indexes)) < len(indexes):
            groups = [[condition] for _, condition in conditions]
        else:
            groups = [[condition for _, condition in conditions]]
        for name in names:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if number == -1 or not any(
                pyseccomp.resolve_syscall(arch, name) >= 0 for arch in arches
            ):
                skipped.add(name)
                continue
            for group in groups:
                # For the same syscall without conditions, libseccomp keeps the first rule's
                # action, as under runc; with the same conditions, it refuses the second one.
                try:
                    filt.add_rule(action, number, *group)
                except FileExistsError as exc:
                    raise self.error(
                        f"{where}: the rule for {name} conflicts with an earlier one"
                    ) from exc
                except OSError as exc:
                    raise self.error(
                        f"{where}: libseccomp refused the rule for {name}: {exc.strerror}"
                    ) from exc


def _export_bpf(filt: pyseccomp.SyscallFilter) -> bytes:
    """The filter's BPF program, through a memfd (no file left behind, no pipe to fill)."""
    with io.FileIO(os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC), "r+") as memfd:
        filt.export_bpf(memfd)
        memfd.seek(0)
        return memfd.readall()
