"""The sandbox's seccomp filter, compiled to a BPF program by libseccomp (through ctypes).

libseccomp knows every architecture's syscall numbers and emits the arch check (a syscall made through
another ABI, such as i386 `int 0x80` on x86_64, kills the process). Its Python binding is not on PyPI, so
we call the four C functions we need directly; the shared library ships with every systemd distribution.

The filter allows by default and refuses (EPERM) what sandboxed code never needs and escapes are made
of: new processes and threads, debugging other processes, namespaces and mounts, kernel keyrings, BPF, perf, kexec and modules,
device nodes, io_uring (its operations bypass seccomp), handles that reopen files by inode, and the
ioctls that set file flags (chattr +i) or push input into a terminal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

_ALLOW = 0x7FFF0000


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


_CMP_EQ, _CMP_GT, _CMP_MASKED_EQ = 4, 6, 7

# Refused outright.
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "mount", "umount", "umount2", "pivot_root", "chroot", "setns", "unshare",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "mknod", "mknodat", "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "acct", "quotactl", "quotactl_fd", "swapon", "swapoff", "reboot", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "iopl", "ioperm", "uselib", "lookup_dcookie", "nfsservctl",
    "migrate_pages", "move_pages", "mbind", "set_mempolicy",
)

DENIED_IOCTLS: dict[str, int] = {
    "FS_IOC_SETFLAGS": 0x40086602,
    "FS_IOC32_SETFLAGS": 0x40046602,
    "FS_IOC_FSSETXATTR": 0x401C5820,
    "TIOCSTI": 0x5412,
    "TIOCLINUX": 0x541C,
}

# socket() families allowed: AF_UNIX, AF_INET, AF_INET6 (the network namespace has only a downed
# loopback). Netlink, packet, vsock, alg, ... are kernel attack surface a program never needs.
_ALLOWED_FAMILIES = (1, 2, 10)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def unavailable_reason() -> str | None:
    """None when a filter can be built here, else what is missing (one line)."""
    if os.name != "posix" or not hasattr(os, "memfd_create"):
        return "seccomp needs Linux"
    if _lib() is None:
        return "libseccomp (libseccomp.so.2) is not installed; install it (Debian: apt install libseccomp2)"
    return None


def _add(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a syscall on this architecture (e.g. `umount` on x86_64)
    arr = (_ArgCmp * max(len(cmps), 1))(*[_ArgCmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp: cannot add the rule for {name}")


@functools.lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The compiled BPF program (what bwrap's `--seccomp FD` reads). Raises OSError if unavailable."""
    why = unavailable_reason()
    if why:
        raise OSError(errno.ENOSYS, why)
    lib = _lib()
    assert lib is not None
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    eperm = _errno(errno.EPERM)
    try:
        for name in DENIED_SYSCALLS:
            _add(lib, ctx, eperm, name)
        # clone3 passes its flags in memory seccomp cannot read: it answers ENOSYS, and glibc falls back
        # to clone(), refused below with fork/vfork (so no new namespaces either).
        _add(lib, ctx, _errno(errno.ENOSYS), "clone3")
        # No new processes or threads: nothing can outlive the run or multiply. (RLIMIT_NPROC does not
        # bind a program that is host root, and a thread bomb costs kernel memory per thread.)
        for name in ("fork", "vfork", "clone"):
            _add(lib, ctx, eperm, name)
        for cmd in DENIED_IOCTLS.values():
            _add(lib, ctx, eperm, "ioctl", (1, _CMP_MASKED_EQ, 0xFFFFFFFF, cmd))
        _add(lib, ctx, _errno(errno.EAFNOSUPPORT), "socket", (0, _CMP_GT, 10, 0))
        for family in range(11):
            if family not in _ALLOWED_FAMILIES:
                _add(lib, ctx, _errno(errno.EAFNOSUPPORT), "socket", (0, _CMP_EQ, family, 0))
        fd = os.memfd_create("nanoctl-seccomp")
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, "seccomp_export_bpf failed")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
