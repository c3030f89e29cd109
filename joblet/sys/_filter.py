"""Installs a compiled seccomp filter in the calling process: the last step of stage 1 before exec.

Standard library only, and no joblet imports: stage 1 runs in ``python -I -S`` and imports this
module by name from its own directory. It imports only what stage 1 has already loaded (``ctypes``,
``os``), since every module imported here is paid for on every job start.

The program comes from :mod:`joblet.sys.seccomp`, compiled once by the daemon. The filter applies
to this process and everything it execs or forks, and cannot be removed. The kernel takes it only
from a process with no_new_privs set (or CAP_SYS_ADMIN): the caller sets no_new_privs first.
"""

import ctypes
import os

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
#: Size of one ``struct sock_filter``.
INSTRUCTION_SIZE = 8
#: The kernel's limit on a classic BPF program (BPF_MAXINSNS).
MAX_INSTRUCTIONS = 4096

_EINVAL = 22
_EACCES = 13
_EFAULT = 14


class _SockFprog(ctypes.Structure):
    """``struct sock_fprog``: the program's length in instructions and its address."""

    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


_libc = ctypes.CDLL(None, use_errno=True)


def install(bpf: bytes) -> None:
    """Install a seccomp filter program in this process (and all it will exec or fork).

    Args:
        bpf: The program, an array of ``struct sock_filter`` in the host's byte order, as
            :attr:`joblet.sys.seccomp.SeccompProfile.bpf` holds it. An empty program is not a
            filter: for the ``off`` setting the caller installs nothing.

    Raises:
        OSError: The program is not one (empty, not whole instructions, too long), or the kernel
            refused it; the message says which, and why when the kernel's errno tells.
    """
    count, rest = divmod(len(bpf), INSTRUCTION_SIZE)
    if rest or not 0 < count <= MAX_INSTRUCTIONS:
        raise OSError(
            _EINVAL,
            f"cannot install the seccomp filter: {len(bpf)} bytes is not a program of 1 to"
            f" {MAX_INSTRUCTIONS} instructions of {INSTRUCTION_SIZE} bytes",
        )
    # The kernel copies the program during the call: the buffer only has to outlive it.
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _SockFprog(count, ctypes.addressof(program))
    result = _libc.prctl(
        PR_SET_SECCOMP,
        ctypes.c_ulong(SECCOMP_MODE_FILTER),
        ctypes.byref(fprog),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )
    if result != 0:
        err = ctypes.get_errno()
        reason = os.strerror(err)
        if err == _EACCES:
            reason += " (no_new_privs is not set and the process lacks CAP_SYS_ADMIN)"
        elif err in (_EINVAL, _EFAULT):
            reason += " (the kernel rejected the program, or has no seccomp filter support)"
        raise OSError(err, f"cannot install the seccomp filter: {reason}")
