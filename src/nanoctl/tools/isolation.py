"""OS-level isolation for the code sandbox: a bubblewrap (`bwrap`) command line, and a probe of what works.

Each run gets fresh user, mount, PID, network, IPC, UTS and cgroup namespaces; a root filesystem that
holds only the interpreter, its stdlib and the shared libraries they load (read-only bind mounts, at
the paths they have on the host); a new procfs for the new PID namespace; a size-capped tmpfs at /tmp as the only writable place; no capabilities,
`PR_SET_NO_NEW_PRIVS` (bwrap always sets it), no further user namespaces, and our seccomp filter.

Inside, the program is uid/gid 65534 with no capabilities. On the host it has bwrap's uid: when we are
root and `nobody` can reach the interpreter, bwrap itself runs as `nobody`, so the program is
unprivileged on the host too. Otherwise (an interpreter under /root, the usual pyenv/venv case) bwrap runs
as root and the program is host uid 0 without capabilities, confined to namespaces it cannot leave:
it sees only the bound files and its own processes. Either way the seccomp filter refuses process
creation (threads included), so RLIMIT_NPROC not applying to host root costs nothing.

bwrap's PID 1 inside the namespace is its reaper; `--die-with-parent` kills it when the outer bwrap
dies, and the kernel then kills every process of the namespace. So killing the outer bwrap at the
deadline leaves nothing behind, and the tmpfs goes with the last process.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nanoctl.tools import seccomp

NOBODY = 65534
NAMESPACES = ("user", "mount", "pid", "net", "ipc", "uts", "cgroup")


def python_executable() -> str:
    """The real interpreter (not a venv's symlink): the sandbox runs it isolated with the stdlib only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@dataclass(frozen=True)
class Layers:
    """What this machine's sandbox holds (`nanoctl doctor` prints it)."""

    bwrap: str | None  # path to bubblewrap, when found and working
    bwrap_version: str = ""
    seccomp: bool = False
    drop_to_nobody: bool = False  # bwrap runs as uid 65534 (we are root)
    host_uid: int = -1  # the uid the sandboxed program has on the host
    missing: list[str] = field(default_factory=list)  # one phrase per missing layer

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None and self.seccomp and not self.missing

    def describe(self) -> list[tuple[str, bool, str]]:
        """(layer, active, detail) rows."""
        if not self.bwrap:
            uid = "-"
        elif self.host_uid != 0:
            uid = f"uid 65534 in the sandbox, uid {self.host_uid} on the host"
        else:
            uid = ("uid 65534 in the sandbox, host root without capabilities (nobody cannot reach this "
                   "interpreter; namespaces and seccomp confine it)")
        return [
            ("bubblewrap", self.bwrap is not None, f"{self.bwrap} {self.bwrap_version}".strip() if self.bwrap else
             "not found or not working"),
            ("namespaces", self.bwrap is not None, ", ".join(NAMESPACES) if self.bwrap else "-"),
            ("filesystem", self.bwrap is not None, "interpreter + stdlib read-only, tmpfs /tmp, new /proc"
             if self.bwrap else "-"),
            ("unprivileged", self.bwrap is not None and self.host_uid != 0, uid),
            ("seccomp", self.seccomp, f"{len(seccomp.DENIED_SYSCALLS)} syscalls + fork/clone + "
             "file-flag/terminal ioctls refused" if self.seccomp else (seccomp.unavailable_reason() or "-")),
            ("rlimits", True, "CPU, memory, file size, processes, open files"),
            ("python guard", True, "audit hook + reliability guard (last layer)"),
        ]


@functools.lru_cache(maxsize=1)
def _library_paths(python: str) -> tuple[str, ...]:
    """Shared objects the interpreter and its extension modules load (`ldd`, once per process)."""
    dynload = Path(_stdlib()) / "lib-dynload"
    targets = [python, *sorted(str(p) for p in dynload.glob("*.so"))] if dynload.is_dir() else [python]
    ldd = shutil.which("ldd")
    if ldd is None:
        return tuple(p for p in ("/usr/lib", "/lib", "/lib64", "/usr/lib64") if os.path.isdir(p))
    r = subprocess.run([ldd, *targets], capture_output=True, text=True, timeout=60)
    found: set[str] = set()
    for line in r.stdout.splitlines():
        parts = line.split()
        # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else (parts[0] if parts else "")
        if path.startswith("/") and os.path.exists(path):
            found.add(path)
    return tuple(sorted(found))


def _stdlib() -> str:
    # The base interpreter's stdlib (sysconfig answers with the venv's paths inside a venv).
    return os.path.dirname(os.path.realpath(os.__file__))


def bind_paths(python: str) -> tuple[str, ...]:
    """Everything the sandbox's root filesystem holds, read-only."""
    keep = {python, _stdlib(), *_library_paths(python)}
    return tuple(sorted(p for p in keep if os.path.exists(p)))


def bwrap_argv(bwrap: str, binds: tuple[str, ...], seccomp_fd: int, *, tmp_bytes: int) -> list[str]:
    """The bwrap command line up to (and including) `--`; the program follows."""
    argv = [
        bwrap,
        "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns",
        "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
        "--setenv", "HOME", "/tmp", "--setenv", "OMP_NUM_THREADS", "1",
    ]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for path in binds:
        # The base interpreter's own site-packages is not stdlib: hide it.
        if os.path.isdir(os.path.join(path, "site-packages")):
            argv += ["--tmpfs", os.path.join(path, "site-packages")]
    argv += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp",
        "--chdir", "/tmp", "--seccomp", str(seccomp_fd), "--",
    ]
    return argv


def seccomp_memfd() -> int:
    """A fresh descriptor holding the compiled filter, positioned at 0 (bwrap reads it to EOF)."""
    fd = os.memfd_create("nanoctl-seccomp")
    os.write(fd, seccomp.filter_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _version(bwrap: str) -> str:
    try:
        r = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip().removeprefix("bubblewrap ").strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _try(bwrap: str, drop: bool) -> tuple[bool, str, int]:
    """Run `print(os.getuid())` in a real sandbox: (worked, error line, host uid)."""
    python = python_executable()
    sfd = seccomp_memfd()
    try:
        argv = bwrap_argv(bwrap, bind_paths(python), sfd, tmp_bytes=1 << 20)
        code = "import os; print(os.getuid(), open('/proc/self/status').read().count('NoNewPrivs:\\t1'))"
        kw = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if drop else {}
        r = subprocess.run(
            [*argv, python, "-I", "-S", "-c", code],
            capture_output=True, text=True, timeout=30, pass_fds=[sfd],
            start_new_session=True, cwd="/", env={"PATH": "/usr/bin:/bin"}, **kw,  # type: ignore[arg-type]
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e), -1
    finally:
        os.close(sfd)
    if r.returncode != 0 or r.stdout.split() != [str(NOBODY), "1"]:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        return False, (lines[-1] if lines else f"exit status {r.returncode}"), -1
    return True, "", NOBODY if drop or os.geteuid() != 0 else 0


@functools.lru_cache(maxsize=1)
def probe() -> Layers:
    """Which layers work here, found by running one real sandbox (cached per process)."""
    missing: list[str] = []
    if sys.platform != "linux":
        return Layers(bwrap=None, missing=[f"Linux namespaces (this is {sys.platform})"])
    why = seccomp.unavailable_reason()
    has_seccomp = why is None
    if why:
        missing.append(why)
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        missing.append("bubblewrap (bwrap) is not installed; install it (Debian/Ubuntu: apt install bubblewrap)")
        return Layers(bwrap=None, seccomp=has_seccomp, missing=missing)
    if not has_seccomp:
        return Layers(bwrap=None, seccomp=False, missing=missing)
    version = _version(bwrap)
    attempts = [True, False] if os.geteuid() == 0 else [False]
    error = ""
    for drop in attempts:
        ok, error, host_uid = _try(bwrap, drop)
        if ok:
            return Layers(bwrap=bwrap, bwrap_version=version, seccomp=True, drop_to_nobody=drop,
                          host_uid=host_uid)
    missing.append(f"bubblewrap cannot create namespaces here ({error}); user namespaces may be disabled "
                   "(sysctl user.max_user_namespaces / kernel.unprivileged_userns_clone)")
    return Layers(bwrap=None, bwrap_version=version, seccomp=True, missing=missing)
