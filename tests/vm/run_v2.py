"""Run pytest inside a real cgroup v2 kernel: ``python -m tests.vm.run_v2 [options] [pytest args]``.

The host (cgroup v1 here) boots Debian's kernel under qemu (TCG, no KVM) with a small initramfs:
a static busybox, ``tests/vm/init.sh`` as ``/init``, the virtio/9p modules and a config file. The
guest mounts the host's root read-only over 9p, gives it fresh /proc, /sys, /dev, a cgroup2
hierarchy on /sys/fs/cgroup, tmpfs on /tmp and /run and a real virtio disk (ext4) on /var/tmp, and
runs ``<python> -m pytest -p no:cacheprovider -m cgroup2 <pytest args>`` chrooted there, in this
repo.
The console streams to our stdout; the guest reports pytest's exit status, which becomes ours.

Missing host tools are installed with apt (Debian 12, as root): qemu-system-x86, linux-image-amd64,
busybox-static, and kmod/e2fsprogs if even those are missing.

Options (anything else, and everything after ``--``, goes to pytest):
    --allow-empty         pytest collecting no test (exit 5) is a success, not a failure.
    --vm-timeout SEC      total limit, boot included (default 2400, or env JOBLET_VM_TIMEOUT).
    --vm-boot-timeout SEC limit until the guest is ready to run pytest (default 300).
    --vm-memory MIB       guest memory (default 2048).
    --vm-smp N            guest vCPUs (default 2).
    --vm-cpu MODEL        qemu CPU model (default: see DEFAULT_CPU).
    --vm-verbose          show the kernel's boot messages.

Exit status: pytest's, or 124 on a timeout, 125 when the VM could not be built, booted or set up.
"""

from __future__ import annotations

import ctypes
import gzip
import lzma
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol

REPO = Path(__file__).resolve().parents[2]
INIT_SCRIPT = Path(__file__).with_name("init.sh")

EXIT_TIMEOUT = 124
EXIT_VM_ERROR = 125
PYTEST_NO_TESTS = 5

# Loaded from the initramfs with busybox insmod, dependencies first (resolved from modules.dep):
# just what it takes to mount the host's root over 9p.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# Loaded afterwards by the host's own modprobe through the 9p root (it handles compression,
# dependencies and softdeps such as ext4's crc32c).
HOST_MODULES = ("virtio_blk", "ext4")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Paths the guest hides under a tmpfs or the disk; the repo or the interpreter living below one
# of them is bound back on top (see init.sh).
MASKED_IN_GUEST = ("/tmp", "/run", "/var/tmp")
# All the features a host binary might use (TCG emulates them), but 4-level paging: la57 only
# makes the emulated page walks longer.
DEFAULT_CPU = "max,la57=off"
# qboot (qemu-system-data) boots a -kernel faster than SeaBIOS and prints nothing on the console.
QBOOT = Path("/usr/share/qemu/qboot.rom")
DISK_MIB = 256
POWER_OFF_GRACE = 30.0  # seconds from the guest's report to qemu's exit
DISK_NAME = "vda"
# Environment variables passed from the host to pytest in the guest.
PASSED_ENV = ("CI", "PYTEST_ADDOPTS")


class VMError(Exception):
    """The VM could not be built, booted or set up (not a test failure)."""


class VMTimeout(VMError):
    """The VM did not get somewhere in time."""


@dataclass
class Options:
    """Command-line options; ``pytest_args`` are appended to the guest's pytest command."""

    allow_empty: bool = False
    timeout: float = float(os.environ.get("JOBLET_VM_TIMEOUT", 2400))
    boot_timeout: float = 300.0
    memory_mib: int = 2048
    smp: int = 2
    cpu: str = DEFAULT_CPU
    verbose: bool = False
    pytest_args: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """Take our own options out of ``argv``; everything else (and all after ``--``) is pytest's."""
    opts = Options()
    valued = {
        "--vm-timeout": ("timeout", float),
        "--vm-boot-timeout": ("boot_timeout", float),
        "--vm-memory": ("memory_mib", int),
        "--vm-smp": ("smp", int),
        "--vm-cpu": ("cpu", str),
    }
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg == "--":
            opts.pytest_args.extend(args[i + 1 :])
            break
        if arg == "--allow-empty":
            opts.allow_empty = True
        elif arg == "--vm-verbose":
            opts.verbose = True
        elif name in valued:
            attr, convert = valued[name]
            if not eq:
                i += 1
                if i == len(args):
                    raise SystemExit(f"run_v2: {name} needs a value")
                value = args[i]
            try:
                setattr(opts, attr, convert(value))
            except ValueError:
                raise SystemExit(f"run_v2: bad value for {name}: {value!r}") from None
        elif arg in ("-h", "--help") and not opts.pytest_args:
            print(__doc__)
            raise SystemExit(0)
        else:
            opts.pytest_args.append(arg)
        i += 1
    return opts


def log(message: str) -> None:
    """One line of our own on stdout, in order with the guest's console."""
    sys.stdout.write(f"[test-cgroup2] {message}\n")
    sys.stdout.flush()


# --- host tools -----------------------------------------------------------------------------------


@dataclass
class Kernel:
    """A bootable kernel image and its module tree."""

    version: str
    image: Path
    modules: Path


@dataclass
class HostTools:
    """Everything on the host that the VM needs."""

    qemu: str
    busybox: Path
    mkfs: str
    kernel: Kernel
    initramfs_modules: list[Path]


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (a CI PATH may lack them)."""
    path = os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH
    return shutil.which(name, path=path)


def is_static_elf(path: Path) -> bool:
    """True when ``path`` is an ELF executable without a program interpreter (PT_INTERP)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for n in range(phnum):
        p_type = int.from_bytes(data[phoff + n * phentsize : phoff + n * phentsize + 4], "little")
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_static_busybox() -> Path | None:
    """A static busybox, which runs in the initramfs with no libraries."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox", which("busybox")):
        if candidate and is_static_elf(Path(candidate)):
            return Path(candidate)
    return None


def module_name(path: str) -> str:
    """``kernel/fs/9p/9p.ko.xz`` -> ``9p``; dashes and underscores are the same to the kernel."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """The module files to insmod for ``wanted``, dependencies (and pre-softdeps) first.

    Modules built into the kernel are left out. Raises VMError if one is neither.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        if mod:
            deps[module_name(mod)] = (mod, [module_name(d) for d in rest.split()])
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    softdeps: dict[str, list[str]] = {}
    softdep_file = moddir / "modules.softdep"
    if softdep_file.exists():
        for line in softdep_file.read_text().splitlines():
            words = line.split()
            if len(words) > 2 and words[0] == "softdep":
                pre = words[words.index("pre:") + 1 :] if "pre:" in words else []
                if "post:" in pre:
                    pre = pre[: pre.index("post:")]
                softdeps[module_name(words[1])] = [module_name(w) for w in pre]

    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, optional: bool) -> None:
        if name in seen or name in builtin:
            return
        if name not in deps:
            if optional:
                return
            raise VMError(f"kernel module {name} is neither in {moddir}/modules.dep nor built in")
        seen.add(name)
        for pre in softdeps.get(name, []):
            visit(pre, optional=True)
        for dep in deps[name][1]:
            visit(dep, optional=False)
        order.append(moddir / deps[name][0])

    for name in wanted:
        visit(name.replace("-", "_"), optional=False)
    return order


def find_kernel() -> tuple[Kernel, list[Path]] | None:
    """The newest /boot/vmlinuz-<ver> whose /lib/modules/<ver> has the modules the VM needs."""

    def version_key(kernel: Path) -> list[tuple[int, str]]:
        parts = re.split(r"(\d+)", kernel.name.removeprefix("vmlinuz-"))
        return [(int(p), "") if p.isdigit() else (-1, p) for p in parts if p]

    for image in sorted(Path("/boot").glob("vmlinuz-*"), key=version_key, reverse=True):
        version = image.name.removeprefix("vmlinuz-")
        moddir = Path("/lib/modules") / version
        if not (moddir / "modules.dep").exists():
            continue
        try:
            modules = resolve_modules(moddir, INITRAMFS_MODULES)
            resolve_modules(moddir, HOST_MODULES)
        except VMError:
            continue
        return Kernel(version, image, moddir), modules
    return None


def missing_packages() -> list[str]:
    """Debian packages to install for the tools that are missing (empty: all there)."""
    missing = []
    if not which("qemu-system-x86_64"):
        missing.append("qemu-system-x86")
    if find_kernel() is None:
        missing.append("linux-image-amd64")
    if find_static_busybox() is None:
        missing.append("busybox-static")
    if not which("modprobe"):
        missing.append("kmod")
    if not which("mkfs.ext4"):
        missing.append("e2fsprogs")
    return missing


def ensure_host_tools() -> HostTools:
    """Find the host tools, installing the missing ones with apt; VMError if that fails."""
    missing = missing_packages()
    if missing:
        lock = ["-o", "DPkg::Lock::Timeout=300"]  # wait for another apt run rather than fail
        install = ["apt-get", *lock, "install", "-y", "--no-install-recommends", *missing]
        if os.geteuid() != 0 or not which("apt-get"):
            raise VMError(f"missing host tools; as root: apt-get update && {shlex.join(install)}")
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", *lock, "update", "-q"], install):
            result = subprocess.run(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                sys.stdout.write(result.stdout[-4000:])
                raise VMError(f"{shlex.join(cmd)} failed with exit status {result.returncode}")
        still = missing_packages()
        if still:
            raise VMError(f"still missing after apt-get install: {' '.join(still)}")
    qemu, mkfs, busybox, found = (
        which("qemu-system-x86_64"), which("mkfs.ext4"), find_static_busybox(), find_kernel()
    )  # fmt: skip
    assert qemu and mkfs and busybox and found  # checked by missing_packages()
    return HostTools(qemu, busybox, mkfs, found[0], found[1])


# --- initramfs and disk ---------------------------------------------------------------------------


Rdev = tuple[int, int]


class SupportsWrite(Protocol):
    """Where the archive goes (a gzip file)."""

    def write(self, data: bytes, /) -> int: ...


class NewcArchive:
    """A minimal writer of the kernel's initramfs format (cpio "newc"), so no `cpio` is needed."""

    def __init__(self, out: SupportsWrite) -> None:
        self._out = out
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: Rdev = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + "".join(f"{v:08X}" for v in fields).encode()
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        """Add ``name`` and its missing parents."""
        parts = name.strip("/").split("/")
        for n in range(1, len(parts) + 1):
            path = "/".join(parts[:n])
            if path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (its directory too)."""
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        """Add a character device node."""
        self._entry(name, 0o020600, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer."""
        self._entry("TRAILER!!!", 0)


def read_module(path: Path) -> bytes:
    """A module's ELF bytes: busybox insmod may not understand compressed modules."""
    if path.name.endswith(".ko"):
        return path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        zstd = which("zstd")
        if not zstd:
            raise VMError(f"{path} is zstd-compressed and there is no zstd: apt-get install zstd")
        return subprocess.run([zstd, "-dcq", str(path)], capture_output=True, check=True).stdout
    raise VMError(f"unknown module format: {path}")


MODPROBE_FORWARDER = b"""#!/bin/sh
# The kernel's own module requests (/proc/sys/kernel/modprobe) go to the host's modprobe.
exec /bin/busybox chroot /host /sbin/modprobe "$@"
"""


def build_initramfs(target: Path, tools: HostTools, conf: str) -> None:
    """Write a gzip'd newc initramfs to ``target``."""
    with gzip.open(target, "wb", compresslevel=1) as out:
        archive = NewcArchive(out)
        for d in ("bin", "sbin", "dev", "proc", "sys", "host", "keep", "modules"):
            archive.directory(d)
        archive.char_device("dev/console", 5, 1)
        archive.file("bin/busybox", tools.busybox.read_bytes(), 0o755)
        archive.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        archive.file("sbin/modprobe", MODPROBE_FORWARDER, 0o755)
        archive.file("vm.conf", conf.encode())
        for module in tools.initramfs_modules:
            archive.file(f"modules/{module_name(module.name)}.ko", read_module(module))
        archive.close()


def make_disk(target: Path, mkfs: str) -> None:
    """A sparse ext4 image for /var/tmp, fully initialised here: the guest's IO is the tests'."""
    with target.open("wb") as f:
        f.truncate(DISK_MIB * 1024 * 1024)
    subprocess.run(
        [mkfs, "-q", "-F", "-m", "0", "-L", "joblet-vm",
         "-E", "lazy_itable_init=0,lazy_journal_init=0", str(target)],
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def kept_paths() -> list[str]:
    """Paths pytest needs that the guest would hide under a tmpfs or the disk."""
    candidates = {
        str(REPO),
        sys.prefix,
        sys.base_prefix,
        str(Path(sys.executable).resolve().parent.parent),
    }
    kept = []
    for path in sorted(candidates):
        if any(path == m or path.startswith(m + "/") for m in MASKED_IN_GUEST):
            if any(c.isspace() for c in path):
                raise VMError(f"cannot keep a path with white space visible in the VM: {path!r}")
            kept.append(path)
    return kept


def guest_command(pytest_args: Sequence[str]) -> list[str]:
    """pytest, run by the guest's init chrooted into the host's root, from the repo."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:{SYSTEM_PATH}",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "JOBLET_TEST_VM": "1",
        # State and job dirs on the guest's ext4 disk: O_DIRECT and IO limits need a block device.
        "TMPDIR": "/var/tmp",
    }
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "cgroup2"]
    return [
        "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
        "/bin/sh", "-c", 'cd "$0" && exec "$@"', str(REPO), *pytest, *pytest_args,
    ]  # fmt: skip


def vm_conf(nonce: str, tools: HostTools, command: Sequence[str]) -> str:
    """The shell fragment that init.sh sources."""
    modules = " ".join(module_name(m.name) for m in tools.initramfs_modules)
    lines = [
        f"NONCE={nonce}",
        f"MODULES={shlex.quote(modules)}",
        f"HOST_MODULES={shlex.quote(' '.join(HOST_MODULES))}",
        f"KEEP={shlex.quote(' '.join(kept_paths()))}",
        f"DISK={DISK_NAME}",
        f"set -- {shlex.join(command)}",
    ]
    return "\n".join(lines) + "\n"


# --- running the VM -------------------------------------------------------------------------------


def qemu_command(opts: Options, tools: HostTools, initramfs: Path, disk: Path) -> list[str]:
    """qemu under TCG (-enable-kvm hung at boot on the CI machine), powering off for good."""
    append = [
        "console=ttyS0", "panic=-1", "oops=panic", "mitigations=off", "rdinit=/init",
        "8250.nr_uarts=1", "random.trust_cpu=on",
    ]  # fmt: skip
    if not opts.verbose:
        append += ["quiet", "loglevel=3"]
    firmware = ["-bios", str(QBOOT)] if QBOOT.exists() else []
    return [
        tools.qemu, *firmware,
        "-accel", "tcg", "-cpu", opts.cpu,
        "-m", str(opts.memory_mib), "-smp", str(opts.smp),
        "-nographic", "-no-reboot", "-vga", "none", "-nic", "none", "-monitor", "none",
        "-kernel", str(tools.kernel.image), "-initrd", str(initramfs),
        "-append", " ".join(append),
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
        "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the qemu child: SIGKILL when we die, even by SIGKILL, so no VM outlives the runner."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Console:
    """Streams the guest's console to stdout, line by line, and watches it for the markers."""

    nonce: str
    started: float
    marks: dict[str, float] = field(default_factory=dict)
    exit_status: int | None = None
    error: str | None = None
    _pending: bytearray = field(default_factory=bytearray)
    _printed: int = 0

    def feed(self, data: bytes) -> None:
        """New console bytes: print complete lines, act on markers."""
        self._pending += data.replace(b"\r", b"")
        while (end := self._pending.find(b"\n")) >= 0:
            line = bytes(self._pending[:end])
            if not self._marker(line):
                self._write(line[self._printed :] + b"\n")
            del self._pending[: end + 1]
            self._printed = 0

    def idle(self) -> None:
        """Nothing new for a while: show the partial line (pytest's progress dots)."""
        if len(self._pending) > self._printed and b"JOBLET-VM-" not in self._pending:
            self._write(bytes(self._pending[self._printed :]))
            self._printed = len(self._pending)

    def flush(self) -> None:
        """The end: whatever is left."""
        self.idle()
        if self._printed:
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    def _marker(self, line: bytes) -> bool:
        pattern = rb"JOBLET-VM-(BOOTED|READY|EXIT|ERROR)-" + self.nonce.encode() + rb"(.*)"
        m = re.search(pattern, line)
        if not m:
            return False
        kind, rest = m.group(1).decode(), m.group(2).decode(errors="replace")
        self.marks[kind] = time.monotonic() - self.started
        if m.start() > 0:
            self._write(line[self._printed : m.start()] + b"\n")
        if kind == "BOOTED":
            log(f"guest kernel {rest.strip()} booted after {self.marks[kind]:.1f} s")
        elif kind == "READY":
            log(f"guest ready after {self.marks[kind]:.1f} s: running pytest")
        elif kind == "EXIT":
            self.exit_status = int(rest.lstrip("="))
        elif kind == "ERROR":
            self.error = rest.lstrip("=")
        return True


def run_vm(opts: Options, argv: list[str], nonce: str) -> Console:
    """Boot the VM and stream its console until it reports; qemu is dead when this returns."""
    started = time.monotonic()
    console = Console(nonce, started)
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            eof = False
            while not eof:
                now = time.monotonic() - started
                reported = console.marks.get("EXIT", console.marks.get("ERROR"))
                if reported is not None:
                    if now > reported + POWER_OFF_GRACE:
                        break  # reported: not worth waiting for the power-off any longer
                elif "READY" not in console.marks and now > opts.boot_timeout:
                    raise VMTimeout(f"the guest was not ready after {opts.boot_timeout:.0f} s")
                elif now > opts.timeout:
                    raise VMTimeout(f"pytest did not finish within {opts.timeout:.0f} s")
                if not sel.select(timeout=0.5):
                    console.idle()
                    continue
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if not data:
                        eof = True
                        break
                    console.feed(data)
    finally:
        console.flush()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    if console.error is not None:
        raise VMError(f"guest setup failed: {console.error}")
    if console.exit_status is None:
        stage = "setting up" if "BOOTED" in console.marks else "booting"
        raise VMError(f"qemu exited ({proc.returncode}) while {stage}, before pytest reported")
    return console


def _raise_on_signal(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the VM; return pytest's exit status, or 124/125 for a timeout or a VM failure."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)
    t0 = time.monotonic()
    try:
        tools = ensure_host_tools()
        t_tools = time.monotonic() - t0
        nonce = secrets.token_hex(8)
        command = guest_command(opts.pytest_args)
        with tempfile.TemporaryDirectory(prefix="joblet-vm-") as tmp:
            initramfs, disk = Path(tmp, "initramfs.cpio.gz"), Path(tmp, "disk.img")
            build_initramfs(initramfs, tools, vm_conf(nonce, tools, command))
            make_disk(disk, tools.mkfs)
            log(
                f"kernel {tools.kernel.version}, {opts.smp} vCPUs (TCG), {opts.memory_mib} MiB; "
                f"host tools {t_tools:.1f} s, images {time.monotonic() - t0 - t_tools:.1f} s; "
                f"in the guest: {shlex.join(command[command.index(sys.executable) :])}"
            )
            argv = qemu_command(opts, tools, initramfs, disk)
            opts.timeout -= time.monotonic() - t0
            console = run_vm(opts, argv, nonce)
    except VMTimeout as e:
        log(f"error: {e}")
        return EXIT_TIMEOUT
    except VMError as e:
        log(f"error: {e}")
        return EXIT_VM_ERROR
    rc = console.exit_status
    assert rc is not None
    ready = console.marks.get("READY", 0.0)
    log(
        f"pytest exited {rc}; boot+setup {ready:.1f} s, pytest "
        f"{console.marks.get('EXIT', ready) - ready:.1f} s, total {time.monotonic() - t0:.1f} s"
    )
    if rc == PYTEST_NO_TESTS and not opts.allow_empty:
        log("error: pytest in the VM collected no tests (pass --allow-empty to accept that)")
    elif rc == PYTEST_NO_TESTS:
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
