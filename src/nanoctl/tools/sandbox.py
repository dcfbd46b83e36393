"""Run untrusted Python (HumanEval completions, model-written code) contained by the kernel.

Layers, outermost first:
1. Isolation (`tools/isolation.py`): bubblewrap gives each run fresh user, mount, PID, network, IPC,
   UTS and cgroup namespaces; a read-only root holding only the interpreter, its stdlib and their shared
   libraries; a new /proc; a size-capped tmpfs /tmp; uid 65534 with no capabilities and NO_NEW_PRIVS.
2. seccomp (`tools/seccomp.py`): no new processes or threads, ptrace, namespaces, mounts, keyrings, BPF, perf,
   kexec, mknod, io_uring, handle-based opens or file-flag ioctls.
3. rlimits, set by the harness before the program runs: CPU, memory, file size, processes, open files.
4. The Python guard (an audit hook plus nanochat's reliability guard): the last layer only. It turns
   most escape attempts into a clear `sandbox: ... is not allowed` instead of a kernel EPERM.

Honest results: success is judged from outside. The harness holds a per-run random token inside its
audit hook and writes it to a pipe only after the program ran to its end; success needs exit status 0
*and* the token. `sys.exit(0)`, `os._exit(0)`, rebinding `SystemExit`, a killed interpreter or a
forged `sys.audit` call all miss it. (Code that walks the interpreter's frames up into the harness can
still reach its runner; the guard refuses the frame lookups that lead there.)

Where bubblewrap, user namespaces or libseccomp are missing, `execute_code` refuses (a failed result
whose `error` says what is missing). `unsafe=True` runs the guard alone in a plain subprocess instead,
as nanochat does (`--unsafe-exec`). `execute_code` never raises: the sandbox's files live in its
own tmpfs and vanish with its last process, so there is nothing on the host to clean up.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from nanoctl.tools import isolation

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT = 64 * 1024  # bytes kept per stream; more than this kills the run
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
TMP_BYTES = 64 * 1024 * 1024  # size of the sandbox's tmpfs /tmp
MAX_PROCS = 16  # RLIMIT_NPROC: a second bound behind seccomp, which refuses new processes and threads
MAX_OPEN_FILES = 64
NOBODY = isolation.NOBODY
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_UNSET = object()


@dataclass
class ExecutionResult:
    """Outcome of one sandboxed run (nanochat's fields, plus output overflow and how long it took)."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    output_exceeded: bool = False
    seconds: float = 0.0


class SandboxUnavailable(RuntimeError):
    """Raised by `require_isolation` when untrusted code cannot be contained here."""


# The harness, run as `python -I -S -c _PRELUDE MARKER_FD MEMORY CPU FSIZE NOFILE NPROC GUARD`. It reads the token line
# and the program from stdin, sets the rlimits, installs the audit hook (which alone holds the token
# and the marker fd), then runs the program with fresh globals. Everything the hook uses is bound
# before the program starts, so rebinding builtins or module attributes cannot weaken it.
_PRELUDE = r"""
import sys, os, posix, resource

def _setup():
    fd, mem, cpu, fsize, nofile, nproc = (int(a) for a in sys.argv[1:7])
    guard = sys.argv[7] == "1"
    del sys.argv[1:]
    token, _, src = sys.stdin.buffer.read().partition(b"\n")
    n = os.open(os.devnull, os.O_RDONLY); os.dup2(n, 0); os.close(n)
    sys.stdin = open(0, "r", closefd=False)
    limits = [(resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc)]
    if cpu > 0:
        limits.append((resource.RLIMIT_CPU, cpu))
    if mem > 0:
        limits += [(resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem)]
    for lim, val in limits:
        try:
            soft, hard = resource.getrlimit(lim)
            val = val if hard == resource.RLIM_INFINITY else min(val, hard)
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    return fd, token, src.decode("utf-8", "replace"), guard

def _run(src, g, streams, audit=sys.audit):
    exec(compile(src, "<sandbox>", "exec"), g)
    for s in streams:
        s.flush()
    audit("nanoctl.sandbox.done")

def _make_hook(token, fd, guard, runner):
    write, exit_, getframe = os.write, posix._exit, sys._getframe
    tmp = os.path.realpath(os.getcwd())
    realpath, join, fspath, isabs = os.path.realpath, os.path.join, os.fspath, os.path.isabs
    startswith, endswith, isinstance_ = str.startswith, str.endswith, isinstance
    str_, bytes_, int_, pathlike = str, bytes, int, os.PathLike
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    done = []
    deny_always = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.chroot",
        "os.putenv", "os.unsetenv", "resource.setrlimit", "resource.prlimit", "sys.setprofile",
        "sys.settrace", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.setuid",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "mmap.__new__",
        "pty.spawn", "webbrowser.open", "_thread.start_new_thread", "os.fchdir", "sys._current_frames",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.sendto", "socket.sendmsg", "socket.socketpair", "os.add_dll_directory",
        "cpython.run_interactivehook", "_xxsubinterpreters.create", "sys.addaudithook",
    ))
    path_events = frozenset((
        "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
        "os.symlink", "os.mkdir", "os.utime", "os.setxattr", "os.removexattr", "os.chflags",
        "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree", "os.mknod", "os.mkfifo",
    ))
    deny_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "cffi", "_xxsubinterpreters",
                              "multiprocessing", "_multiprocessing", "resource", "pty", "psutil"))
    main = getframe(1).f_code  # the harness's top level
    protected = frozenset((runner, main))
    checking = []

    def text(p):
        if isinstance_(p, bytes_):
            return p.decode("utf-8", "surrogateescape")
        return fspath(p)

    def inside(p):
        if isinstance_(p, int_):
            return True  # an already-open descriptor (stdout, a temp file)
        full = realpath(join(tmp, text(p)))
        return full == tmp or startswith(full, tmp + "/")

    def hook(event, args):
        if event == "nanoctl.sandbox.done":
            # Genuine only from the one `_run` call the harness's top level makes: a caller rerunning
            # `_run` (found through frames) has its own frame above it, not the top level.
            checking.append(1)
            try:
                caller = getframe(1)
            finally:
                checking.pop()
            top = caller.f_back
            if done or caller.f_code is not runner or top is None or top.f_code is not main or (
                    top.f_back is not None):
                raise PermissionError("sandbox: forged completion")
            done.append(1)
            write(fd, token)
            exit_(0)
        if not guard:
            return
        if event in deny_always or startswith(event, "socket.") or startswith(event, "ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            name = args[0] or ""
            if name.split(".")[0] in deny_imports:
                raise ImportError(f"sandbox: import of {name} is not allowed")
        elif event == "sys._getframe":
            if not checking and args and getattr(args[0], "f_code", None) in protected:
                raise PermissionError("sandbox: reaching the harness's frames is not allowed")
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if isinstance_(path, (str_, bytes_)):
                s = text(path)
                full = realpath(s if isabs(s) else join(tmp, s))
                if startswith(full, "/proc/") and (endswith(full, "/environ") or endswith(full, "/mem")):
                    raise PermissionError(f"sandbox: opening {s} is not allowed")
            writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
                isinstance_(flags, int_) and flags & wflags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        elif event in path_events:
            for a in args:
                if isinstance_(a, (str_, bytes_, pathlike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} on {a!r} outside the sandbox directory")
            # A dir_fd makes a relative path point anywhere: refuse it (the kernel layers hold anyway).
            dirfds = args[2:4] if event in ("os.rename", "os.link") else args[-1:]
            if any(isinstance_(d, int_) and d >= 0 for d in dirfds) and event != "os.symlink" or (
                    event == "os.symlink" and isinstance_(args[-1], int_) and args[-1] >= 0):
                raise PermissionError(f"sandbox: {event} relative to a directory descriptor")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] in (
                "__code__", "__defaults__", "__kwdefaults__", "__globals__", "cell_contents"):
            raise PermissionError("sandbox: rebinding function internals is not allowed")
    return hook

_fd, _token, _src, _guard = _setup()
sys.addaudithook(_make_hook(_token, _fd, _guard, _run.__code__))
del _make_hook, _setup, _token, _fd

if _guard:
    # nanochat's reliability guard: disable destructive functions outright.
    import builtins, faulthandler, shutil
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for _n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
               "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
               "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "chdir", "_exit",
               "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn",
               "posix_spawnp", "abort", "mknod", "mkfifo", "link", "symlink"):
        if hasattr(os, _n):
            setattr(os, _n, None)
        if hasattr(posix, _n):
            setattr(posix, _n, None)
    for _n in ("rmtree", "move", "chown"):
        setattr(shutil, _n, None)
    for _n in ("ipdb", "joblib", "resource", "psutil", "tkinter", "subprocess", "ctypes"):
        sys.modules[_n] = None
    del _n
_run(_src, {"__name__": "__main__", "__builtins__": __builtins__}, (sys.stdout, sys.stderr))
"""


def layers() -> isolation.Layers:
    """What isolates sandboxed code on this machine (probed once per process)."""
    return isolation.probe()


def require_isolation() -> None:
    """Raise SandboxUnavailable (one line: what is missing, and the way out) unless code is contained."""
    lay = layers()
    if not lay.isolated:
        raise SandboxUnavailable(_refusal(lay))


def _refusal(lay: isolation.Layers) -> str:
    missing = "; ".join(lay.missing) or "the isolation probe failed"
    return (f"cannot run untrusted code safely here: {missing}. Pass --unsafe-exec to run it with the "
            "Python guard alone (not a security boundary)")


# --- the guard-only fallback (unsafe=True): today's process set-up, for machines without bwrap ------


def _libc_unshare(flags: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(ctypes.c_int(flags)) == 0
    except Exception:
        return False


def _preexec(netns: bool, drop_to: int | None) -> None:
    """Runs in the forked child before exec (guard-only mode): network namespace and uid drop."""
    if netns:
        _libc_unshare(_CLONE_NEWNET if os.geteuid() == 0 else (_CLONE_NEWUSER | _CLONE_NEWNET))
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to)
        os.setuid(drop_to)


@functools.lru_cache(maxsize=1)
def _guard_only_probe() -> tuple[bool, int | None]:
    """(network namespace works, uid to drop to) for the guard-only mode, probed once."""
    if sys.platform != "linux":
        return False, None
    python, env = isolation.python_executable(), {"PATH": "/usr/bin:/bin"}

    def works(netns: bool, drop: int | None, code: str, want: str) -> bool:
        try:
            r = subprocess.run([python, "-I", "-c", code], preexec_fn=functools.partial(_preexec, netns, drop),
                               capture_output=True, text=True, timeout=10, env=env, cwd="/")
            return r.returncode == 0 and r.stdout.strip() == want
        except (OSError, subprocess.SubprocessError):
            return False

    netns = works(True, None, "import socket; print(len(socket.if_nameindex()))", "1")
    drop = NOBODY if os.geteuid() == 0 and works(netns, NOBODY, "print('ok')", "ok") else None
    return netns, drop


def network_isolation() -> str:
    """'namespace' when sandboxed code gets its own network namespace, else 'guard' (audit hook only)."""
    return "namespace" if layers().isolated or _guard_only_probe()[0] else "guard"


# --- running one program -----------------------------------------------------------------------------


def _kill(proc: subprocess.Popen[bytes]) -> None:
    # The outer bwrap leads its own session; killing it makes the kernel kill the whole PID namespace
    # (bwrap's --die-with-parent), so no detached descendant survives.
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _collect(proc: subprocess.Popen[bytes], deadline: float, max_output: int) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until both close, the deadline passes or output overflows."""
    assert proc.stdout is not None and proc.stderr is not None
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    timed_out = overflow = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        open_streams = 2
        while open_streams and not overflow:
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
                room = max_output - len(buf)
                buf += chunk[: max(room, 0)]
                overflow = overflow or len(chunk) > room
    if not timed_out and not overflow:
        try:  # streams closed: the program is exiting; still bound the wait by the deadline
            proc.wait(timeout=max(deadline - time.monotonic(), 0.05))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or overflow:
        _kill(proc)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    _kill(proc)
    out, err = bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()]
    proc.stdout.close()
    proc.stderr.close()
    return bytes(out), bytes(err), timed_out, overflow


def _read_marker(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 256)
    except (BlockingIOError, OSError):
        return b""


def execute_code(
    code: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_memory_bytes: int | None = DEFAULT_MAX_MEMORY,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    *,
    maximum_memory_bytes: int | None | object = _UNSET,
    unsafe: bool = False,
    guard: bool = True,
) -> ExecutionResult:
    """Run `code` contained and report what happened. Never raises.

    `max_memory_bytes=None` (or nanochat's spelling, `maximum_memory_bytes=None`) means no memory cap.
    `unsafe=True` runs with the Python guard alone (nanochat's way; `--unsafe-exec`). `guard=False` leaves
    the Python guard out, so the kernel layers alone contain the code (the tests use it to prove them).
    """
    if maximum_memory_bytes is not _UNSET:
        max_memory_bytes = maximum_memory_bytes  # type: ignore[assignment]
    t0 = time.monotonic()
    try:
        return _execute(code, timeout, max_memory_bytes, max_output_bytes, unsafe, guard, t0)
    except Exception as e:  # the harness itself failed (fd exhaustion, a vanished binary, ...)
        return ExecutionResult(False, "", "", error=f"sandbox: {type(e).__name__}: {e}",
                               seconds=time.monotonic() - t0)


def _execute(
    code: str, timeout: float, mem: int | None, max_output: int, unsafe: bool, guard: bool, t0: float
) -> ExecutionResult:
    lay = None if unsafe else layers()
    if lay is not None and not lay.isolated:
        return ExecutionResult(False, "", "", error=_refusal(lay), seconds=time.monotonic() - t0)
    python = isolation.python_executable()
    token = secrets.token_hex(16).encode()
    mark_r, mark_w = os.pipe()
    cpu = max(1, math.ceil(timeout)) + 1  # CPU seconds: a backstop behind the wall-clock deadline
    limits = (mark_w, mem or 0, cpu, MAX_FILE_BYTES, MAX_OPEN_FILES, MAX_PROCS, int(guard))
    args = [python, "-I", "-S", "-c", _PRELUDE, *(str(v) for v in limits)]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    extra_fds: list[int] = []
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    try:
        if lay is not None:
            sfd = isolation.seccomp_memfd()
            extra_fds.append(sfd)
            argv = isolation.bwrap_argv(lay.bwrap or "bwrap", isolation.bind_paths(python), sfd,
                                        tmp_bytes=TMP_BYTES) + args
            kw: dict[str, object] = {"cwd": "/"}
            if lay.drop_to_nobody:
                kw.update(user=NOBODY, group=NOBODY, extra_groups=[])
        else:
            netns, drop = _guard_only_probe()
            tmpdir = tempfile.TemporaryDirectory(prefix="nanoctl-sandbox-", ignore_cleanup_errors=True)
            if drop is not None:
                os.chown(tmpdir.name, drop, drop)
            argv = args
            kw = {"cwd": tmpdir.name, "preexec_fn": functools.partial(_preexec, netns, drop)}
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True, pass_fds=[mark_w, *extra_fds], **kw,  # type: ignore[arg-type]
        )
        os.close(mark_w)
        mark_w = -1
        for fd in extra_fds:
            os.close(fd)
        extra_fds = []
        assert proc.stdin is not None
        try:
            proc.stdin.write(token + b"\n" + code.encode("utf-8", "replace"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        out, err, timed_out, overflow = _collect(proc, t0 + timeout, max_output)
        marker = _read_marker(mark_r)
    finally:
        for fd in (mark_r, mark_w, *extra_fds):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if tmpdir is not None:
            try:
                tmpdir.cleanup()
            except OSError:
                pass  # an immutable file the program left behind: harmless, and never our crash
    return _result(proc.returncode, out, err, marker == token, timed_out, overflow, timeout, max_output, t0)


def _result(
    rc: int | None, out: bytes, err: bytes, finished: bool, timed_out: bool, overflow: bool,
    timeout: float, max_output: int, t0: float,
) -> ExecutionResult:
    out_s = out.decode("utf-8", "replace")
    err_s = err.decode("utf-8", "replace")
    # bwrap reports a signal death as 128+N; a bare interpreter as -N.
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc is not None and 128 < rc < 160 else 0)
    memory = "MemoryError" in err_s or (sig in (signal.SIGSEGV, signal.SIGKILL) and not timed_out and not overflow)
    success = rc == 0 and finished and not timed_out and not overflow
    error: str | None = None
    if timed_out:
        error = f"timed out after {timeout:g}s"
    elif overflow:
        error = f"output exceeded {max_output} bytes"
    elif sig == signal.SIGXCPU:
        error = "CPU time limit exceeded"
    elif rc == 0 and not finished:
        error = "the program exited before its end (sys.exit/os._exit), counted as a failure"
    elif rc != 0:
        lines = [ln for ln in err_s.strip().splitlines() if ln.strip()]
        error = lines[-1] if lines else (f"killed by signal {sig}" if sig else f"exit status {rc}")
        if memory and "MemoryError" not in error:
            error = "MemoryError: memory limit exceeded"
    return ExecutionResult(
        success=success, stdout=out_s, stderr=err_s, error=None if success else error, timeout=timed_out,
        memory_exceeded=memory, output_exceeded=overflow, seconds=time.monotonic() - t0,
    )
