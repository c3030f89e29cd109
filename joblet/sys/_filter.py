"""Installs a job's seccomp filter: standard library only, imported by stage 1 by module name.

The daemon compiles the profile once (:mod:`joblet.sys.seccomp`); stage 1 loads the program as
the last step before it execs the job's PID 1, after no_new_privs.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
#: Size of one classic-BPF instruction (``struct sock_filter``).
INSTRUCTION_SIZE = 8


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install(bpf: bytes) -> None:
    """Load ``bpf`` (``struct sock_filter`` instructions) as this thread's seccomp filter.

    Raises:
        OSError: The kernel refused it (no_new_privs not set, a malformed program).
    """
    if not bpf or len(bpf) % INSTRUCTION_SIZE:
        raise OSError(f"a seccomp program of {len(bpf)} bytes is not whole instructions")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // INSTRUCTION_SIZE, ctypes.addressof(program))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
