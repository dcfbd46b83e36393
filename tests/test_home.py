"""The artifact home is resolved once, by an entry point, and passed down as a `Home`.

`Home.resolve` is the one reader of $NANOCTL_HOME; the CLI keeps the resolved home on its context (never
in os.environ); torchrun workers get it in their own environment. The source checks below pin who may
resolve: home.py, cli/, and the entry-point functions listed in ENTRY_POINTS.
"""

from __future__ import annotations

import ast
import io
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import nanoctl
from nanoctl import dist
from nanoctl.cli.cache import cache_app
from nanoctl.cli.main import app
from nanoctl.home import HOME_ENV, Home

runner = CliRunner()
SRC = Path(nanoctl.__file__).resolve().parent
MODULES = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py"))

# The public top-level functions a library user calls: each may call Home.resolve once, at its top.
# Everything else takes `home: Home`. Anything under cli/ may resolve too (the root callback, home_of).
ENTRY_POINTS: dict[str, set[str]] = {
    "tokenizer.py": {"load_tokenizer", "load_token_bytes"},
    "checkpoint.py": {"load_model"},
    "tok_train.py": {"train_tokenizer"},
    "tok_eval.py": {"evaluate_tokenizer"},
    "data/download.py": {"download"},
    "data/ingest.py": {"ingest"},
    "data/shards.py": {"list_data"},
    "tasks/ingest.py": {"ingest_task_data", "task_availability"},
    "evaluate/base.py": {"eval_base"},
    "evaluate/chat.py": {"run_chat_eval"},
    "report.py": {"generate_report"},
    "cache.py": {"list_artifacts", "resolve_targets"},
    "chat.py": {"load_chat_model"},
    "pipeline.py": {"run_pipeline"},
    "nanochat_import.py": {"import_nanochat"},
    "serve/server.py": {"serve"},
    # the training stages: each entry point hands its home to run_stage, which resolves it once
    "train/stage.py": {"run_stage"},
    "train/pretrain.py": {"pretrain"},
    "train/mid.py": {"mid"},
    "train/sft.py": {"sft"},
    "train/rl.py": {"rl"},
}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _qualname(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    names = []
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
    return ".".join(reversed(names)) or "<module>"


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _is_home_key(node: ast.AST | None) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == "NANOCTL_HOME"
    return (isinstance(node, ast.Name) and node.id == "HOME_ENV") or (
        isinstance(node, ast.Attribute) and node.attr == "HOME_ENV"
    )


def env_accesses(tree: ast.AST) -> list[int]:
    """Lines that read, test, write or delete NANOCTL_HOME in os.environ (a child's env dict is fine)."""
    lines = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.Subscript):
            hit = _is_environ(node.value) and _is_home_key(node.slice)
        elif isinstance(node, ast.Call) and node.args and _is_home_key(node.args[0]):
            f = node.func
            hit = (isinstance(f, ast.Attribute) and _is_environ(f.value)) or (
                (isinstance(f, ast.Name) and f.id in ("getenv", "putenv", "unsetenv"))
                or (isinstance(f, ast.Attribute) and f.attr in ("getenv", "putenv", "unsetenv"))
            )
        elif isinstance(node, ast.Compare):
            hit = _is_home_key(node.left) and any(_is_environ(c) for c in node.comparators)
        if hit:
            lines.append(node.lineno)
    return lines


def resolve_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, enclosing function) of every `Home.resolve(...)` (and the retired `resolve_home(...)`)."""
    parents = _parents(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_resolve = (
            isinstance(f, ast.Attribute)
            and f.attr == "resolve"
            and (
                (isinstance(f.value, ast.Name) and f.value.id == "Home")
                or (isinstance(f.value, ast.Attribute) and f.value.attr == "Home")
            )
        )
        if is_resolve or (isinstance(f, ast.Name) and f.id == "resolve_home"):
            found.append((node.lineno, _qualname(node, parents)))
    return found


def _tree(module: str) -> ast.AST:
    return ast.parse((SRC / module).read_text(encoding="utf-8"), filename=module)


# --- Home.resolve ------------------------------------------------------------------------------------------


def test_resolve_passes_a_home_through_and_reads_the_env_only_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = Home(tmp_path / "given")
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "env"))
    assert Home.resolve(given) is given  # a Home is returned unchanged, whatever the environment says
    assert Home.resolve(tmp_path / "arg") == Home((tmp_path / "arg").resolve())  # explicit > env
    assert Home.resolve(str(tmp_path / "arg")).root == (tmp_path / "arg").resolve()
    assert Home.resolve().root == (tmp_path / "env").resolve()
    monkeypatch.delenv(HOME_ENV)
    from platformdirs import user_cache_dir

    assert Home.resolve().root == Path(user_cache_dir("nanoctl")).resolve()
    assert not (tmp_path / "arg").exists()  # resolving creates nothing


# --- the CLI: resolved once, kept on the context -----------------------------------------------------------


def test_cli_home_flag_is_not_written_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    flag_home = tmp_path / "flag"
    ck = flag_home / "checkpoints" / "base" / "d2"
    ck.mkdir(parents=True)
    (ck / "model_000003.pt").write_bytes(b"x")
    (ck / "meta_000003.json").write_text("{}")
    res = runner.invoke(app, ["--home", str(flag_home), "cache", "path"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(flag_home.resolve())
    res = runner.invoke(app, ["--home", str(flag_home), "cache", "ls", "--json"])
    assert res.exit_code == 0, res.output
    assert '"base/d2@3"' in res.stdout  # the library got the flag's home, not an ambient one
    assert HOME_ENV not in os.environ


def test_cli_flag_beats_env_and_leaves_it_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "env"))
    res = runner.invoke(app, ["cache", "path"])
    assert res.stdout.strip() == str((tmp_path / "env").resolve())
    res = runner.invoke(app, ["--home", str(tmp_path / "flag"), "cache", "path"])
    assert res.stdout.strip() == str((tmp_path / "flag").resolve())
    assert os.environ[HOME_ENV] == str(tmp_path / "env")


def test_home_of_falls_back_to_the_default_without_the_root_callback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "env"))
    res = runner.invoke(cache_app, ["path"])  # a sub-app on its own: no root callback stored a Home
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str((tmp_path / "env").resolve())


# --- torchrun workers: the home travels in the child's environment only -------------------------------------


def test_relaunch_hands_the_home_to_the_workers_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    seen: dict[str, Any] = {}

    class FakeProc:
        stdout = io.StringIO("")
        stderr = io.StringIO("")

        def wait(self) -> int:
            return 0

    def fake_popen(cmd: list[str], env: dict[str, str], **kwargs: Any) -> FakeProc:
        seen.update(cmd=cmd, env=env)
        return FakeProc()

    monkeypatch.setattr(dist.subprocess, "Popen", fake_popen)
    home = Home(tmp_path / "h")
    assert dist.relaunch_with_torchrun(2, argv=["pretrain"], home=home) == 0
    assert seen["env"][HOME_ENV] == str(home.root) and seen["env"][dist.CHILD_ENV] == "1"
    assert seen["cmd"][-2:] == ["nanoctl", "pretrain"]
    assert HOME_ENV not in os.environ


# --- the library never consults the environment for the home -------------------------------------------------


def test_the_source_checks_see_what_they_look_for() -> None:
    for code in (
        'os.environ.get("NANOCTL_HOME")',
        'os.environ["NANOCTL_HOME"] = "x"',
        '"NANOCTL_HOME" in os.environ',
        "os.getenv(HOME_ENV)",
        "environ.setdefault(HOME_ENV, 'x')",
    ):
        assert env_accesses(ast.parse(code)), code
    assert not env_accesses(ast.parse('env = {**os.environ, "NANOCTL_HOME": "x"}'))
    calls = resolve_calls(ast.parse("def f():\n    def g():\n        Home.resolve(x)\nh.Home.resolve()"))
    assert sorted(calls) == [(3, "f.g"), (4, "<module>")]


@pytest.mark.parametrize("module", [m for m in MODULES if m != "home.py"])
def test_only_home_py_reads_nanoctl_home_from_the_environment(module: str) -> None:
    assert env_accesses(_tree(module)) == [], f"{module} touches NANOCTL_HOME in os.environ"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "home.py" and not m.startswith("cli/")])
def test_only_entry_points_resolve_the_home(module: str) -> None:
    allowed = ENTRY_POINTS.get(module, set())
    bad = [f"{module}:{line} in {fn}" for line, fn in resolve_calls(_tree(module)) if fn not in allowed]
    assert not bad, f"Home.resolve below an entry point (take `home: Home` instead): {bad}"


def test_each_entry_point_resolves_once() -> None:
    for module, names in ENTRY_POINTS.items():
        if not (SRC / module).exists():
            continue
        calls = [fn for _, fn in resolve_calls(_tree(module))]
        for name in names:
            assert calls.count(name) <= 1, f"{module}:{name} resolves the home more than once"


@pytest.mark.parametrize("module", MODULES)
def test_no_options_dataclass_carries_a_home(module: str) -> None:
    """The home is an entry point's own parameter, never a field of its options."""
    for node in ast.walk(_tree(module)):
        if not isinstance(node, ast.ClassDef):
            continue
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        if not any(getattr(d, "id", getattr(d, "attr", None)) == "dataclass" for d in decorators):
            continue
        fields = [
            s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        ]
        assert "home" not in fields, f"{module}: {node.name} has a `home` field"
