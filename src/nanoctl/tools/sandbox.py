"""Run untrusted Python (HumanEval completions) in a separate, limited process.

Layers, outermost first (each one catches what the next might miss):
1. A fresh `python -I` process in its own session/process group, cwd = a new TemporaryDirectory, stdin
   closed, environment scrubbed to PATH only. On timeout or runaway output the whole group is SIGKILLed.
2. OS limits set before exec: RLIMIT_AS/DATA (memory), RLIMIT_FSIZE (file size), RLIMIT_CORE=0,
   RLIMIT_NPROC (processes; not enforced by Linux for uid 0, hence also layer 4).
3. Network: a fresh network namespace (only a downed loopback) via unshare(2) when the kernel allows it
   (root, or unprivileged user namespaces); otherwise socket creation is refused by layer 4.
   `network_isolation()` says which one is active. When running as root and the interpreter is reachable
   by `nobody`, the child also drops to uid/gid 65534.
4. A guard prelude in the child: a `sys.addaudithook` hook (cannot be removed from Python) refuses
   process creation, signals, sockets, ctypes/_posixsubprocess imports, gc introspection, rlimit changes
   and any write/delete/rename outside the temp dir; then nanochat's reliability guard sets the dangerous
   os/shutil/builtins functions to None. `sys.exit` (any code) and `os._exit` count as failures.

Not a VM: no seccomp, and a determined attacker with a C-level exploit in CPython could still escape.
"""

from __future__ import annotations

import ctypes
import functools
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT = 64 * 1024  # bytes kept per stream; more than this kills the run
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the child may write
MAX_PROCS = 1  # RLIMIT_NPROC for a non-root uid: no fork/threads beyond the child itself
NOBODY = 65534
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run (same fields as nanochat's, plus how long it took)."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    output_exceeded: bool = False
    seconds: float = 0.0


# The guard prelude. Receives the untrusted program on stdin (so no argv size limit), then closes stdin.
# Everything the hook needs is bound as default arguments / constants so user code cannot rebind globals
# to weaken it; gc/frame introspection that could reach the hook is itself refused.
_PRELUDE = r"""
import sys, os
_src = sys.stdin.buffer.read().decode("utf-8", "replace")
_fd = os.open(os.devnull, os.O_RDONLY); os.dup2(_fd, 0); os.close(_fd)
sys.stdin = open(0, "r", closefd=False)
os.environ["OMP_NUM_THREADS"] = "1"

def _make_hook():
    tmp = os.path.realpath(os.getcwd())
    realpath, join, fspath, isabs = os.path.realpath, os.path.join, os.fspath, os.path.isabs
    startswith = str.startswith
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    my_pid = os.getpid()
    deny_always = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.chroot",
        "os.putenv", "os.unsetenv", "resource.setrlimit", "resource.prlimit", "sys.setprofile",
        "sys.settrace", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.setuid",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "mmap.__new__",
        "pty.spawn", "webbrowser.open", "_thread.start_new_thread", "os.fchdir",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.sendto", "socket.sendmsg", "socket.socketpair", "os.add_dll_directory",
    ))
    path_events = frozenset((
        "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.mkdir", "os.utime", "os.setxattr", "os.removexattr", "os.chflags",
        "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree",
    ))
    deny_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "cffi", "_xxsubinterpreters",
                              "multiprocessing", "_multiprocessing", "resource", "pty", "psutil"))

    def inside(p):
        if isinstance(p, int):
            return True  # an already-open descriptor (stdout, a temp file)
        if isinstance(p, bytes):
            p = p.decode("utf-8", "replace")
        p = fspath(p)
        full = realpath(p if isabs(p) else join(tmp, p))
        return full == tmp or startswith(full, tmp + "/")

    def hook(event, args):
        if event in deny_always or startswith(event, "socket.") or startswith(event, "ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            name = args[0] or ""
            if name.split(".")[0] in deny_imports:
                raise ImportError(f"sandbox: import of {name} is not allowed")
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if isinstance(path, (str, bytes)):
                s = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
                full = realpath(s if isabs(s) else join(tmp, s))
                if startswith(full, "/proc/") and not (startswith(full, f"/proc/{my_pid}/")
                                                       or startswith(full, "/proc/self/")):
                    raise PermissionError(f"sandbox: reading {s} is not allowed")
                if startswith(full, "/proc/") and full.endswith("/environ"):
                    raise PermissionError(f"sandbox: reading {s} is not allowed")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & wflags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} on {a!r} outside the sandbox directory")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] in (
                "__code__", "__defaults__", "__kwdefaults__", "__globals__", "cell_contents"):
            raise PermissionError("sandbox: rebinding function internals is not allowed")
    return hook

sys.addaudithook(_make_hook())
del _make_hook

# nanochat's reliability guard: disable destructive functions outright.
import builtins, faulthandler, shutil, posix
faulthandler.disable()
builtins.exit = None
builtins.quit = None
builtins.help = None
for _n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "_exit", "execv",
           "execve", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "abort"):
    if hasattr(os, _n):
        setattr(os, _n, None)
    if hasattr(posix, _n):
        setattr(posix, _n, None)
for _n in ("rmtree", "move", "chown"):
    setattr(shutil, _n, None)
for _n in ("ipdb", "joblib", "resource", "psutil", "tkinter", "subprocess", "ctypes"):
    sys.modules[_n] = None
del _n, _fd

_g = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(_src, "<sandbox>", "exec"), _g)
except SystemExit as _e:
    # Exiting early (even with 0) means the checks did not run to the end: count it as a failure.
    sys.stderr.write(f"SystemExit: sandboxed code called sys.exit({_e.code!r})\n")
    sys.stderr.flush()
    raise SystemExit(3)
"""


def _libc_unshare(flags: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(ctypes.c_int(flags)) == 0
    except Exception:
        return False


def _preexec(max_memory_bytes: int, netns: bool, drop_to: int | None) -> None:
    """Runs in the forked child before exec: namespace, limits, uid drop. Must not raise into nothing."""
    import resource

    if netns:
        flags = _CLONE_NEWNET if os.geteuid() == 0 else (_CLONE_NEWUSER | _CLONE_NEWNET)
        _libc_unshare(flags)
    for lim, val in (
        (resource.RLIMIT_AS, max_memory_bytes),
        (resource.RLIMIT_DATA, max_memory_bytes),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
        (resource.RLIMIT_CORE, 0),
    ):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to)
        os.setuid(drop_to)
    # After any uid change, so execve is not refused for the new uid's existing process count.
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCS, MAX_PROCS))
    except (ValueError, OSError):
        pass


def _python() -> str:
    # The real interpreter (not a venv symlink): the child needs only the stdlib and runs isolated (-I).
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, int | None]:
    """(network namespace works, uid to drop to or None), probed once per process."""
    if sys.platform != "linux":
        return False, None
    code = "import socket; print(len(socket.if_nameindex()))"
    env = {"PATH": "/usr/bin:/bin"}
    netns = False
    try:
        r = subprocess.run(
            [_python(), "-I", "-c", code],
            preexec_fn=functools.partial(_preexec, DEFAULT_MAX_MEMORY, True, None),
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            cwd="/",
        )
        # In a fresh namespace the only interface is loopback.
        netns = r.returncode == 0 and r.stdout.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        netns = False
    drop: int | None = None
    if os.geteuid() == 0:
        try:
            r = subprocess.run(
                [_python(), "-I", "-c", "print('ok')"],
                preexec_fn=functools.partial(_preexec, DEFAULT_MAX_MEMORY, netns, NOBODY),
                capture_output=True,
                text=True,
                timeout=10,
                env=env,
                cwd="/",
            )
            drop = NOBODY if r.returncode == 0 and r.stdout.strip() == "ok" else None
        except (OSError, subprocess.SubprocessError):
            drop = None
    return netns, drop


def network_isolation() -> str:
    """'namespace' (fresh network namespace) or 'guard' (sockets refused by the audit hook only)."""
    return "namespace" if _probe()[0] else "guard"


def privilege_drop() -> bool:
    """True when sandboxed code runs as uid 65534 (we are root and the interpreter is reachable)."""
    return _probe()[1] is not None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def execute_code(
    code: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT,
) -> ExecutionResult:
    """Run `code` in a sandboxed subprocess and report what happened. Never raises for bad code."""
    netns, drop = _probe()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nanoctl-sandbox-") as tmp:
        if drop is not None:
            os.chown(tmp, drop, drop)
        proc = subprocess.Popen(
            [_python(), "-I", "-S", "-c", _PRELUDE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True,  # own process group: one killpg reaches every descendant
            preexec_fn=functools.partial(_preexec, max_memory_bytes, netns, drop),
            close_fds=True,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(code.encode("utf-8", "replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs: dict[int, bytearray] = {out_fd: bytearray(), err_fd: bytearray()}
        timed_out = overflow = False
        deadline = t0 + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            open_streams = 2
            while open_streams:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(timeout=min(left, 0.1)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                        continue
                    buf = bufs[key.fd]
                    room = max_output_bytes - len(buf)
                    buf += chunk[: max(room, 0)]
                    if len(chunk) > room:
                        overflow = True
                if overflow:
                    break
        if timed_out or overflow:
            _kill_group(proc)
        else:
            # Streams closed: the child is exiting; still bound the wait by the deadline.
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        proc.stdout.close()
        proc.stderr.close()
        # A descendant that escaped the wait still belongs to the group: kill it before cleanup.
        _kill_group(proc)
    out_s = bytes(bufs[out_fd]).decode("utf-8", "replace")
    err_s = bytes(bufs[err_fd]).decode("utf-8", "replace")
    rc = proc.returncode
    memory = "MemoryError" in err_s or (rc is not None and rc < 0 and -rc == signal.SIGSEGV and not timed_out)
    error: str | None = None
    if timed_out:
        error = f"timed out after {timeout:g}s"
    elif overflow:
        error = f"output exceeded {max_output_bytes} bytes"
    elif rc != 0:
        lines = [ln for ln in err_s.strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else f"exit status {rc}"
        if memory and "MemoryError" not in error:
            error = "MemoryError: memory limit exceeded"
    success = rc == 0 and not timed_out and not overflow
    return ExecutionResult(
        success=success,
        stdout=out_s,
        stderr=err_s,
        error=None if success else error,
        timeout=timed_out,
        memory_exceeded=memory,
        output_exceeded=overflow,
        seconds=time.monotonic() - t0,
    )
