"""A model with your name: `--identity-name NAME --identity-creator WHO` rewrite the bundled identity
conversations (tasks/identity.py) for mid and sft, and `nanoctl run` passes them through. Checked on every
bundled conversation; the slow test trains the tiny pipeline and asks it who it is."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nanoctl.cli.main import app
from nanoctl.errors import UsageError
from nanoctl.home import Home
from nanoctl.tasks.identity import DEFAULT_CREATOR, DEFAULT_NAME, Persona, slug

runner = CliRunner()
AVA = Persona("Ava", "Jane Doe")


def bundled() -> list[dict[str, Any]]:
    """The packaged identity conversations, as the Identity task loads them."""
    raw = (resources.files("nanoctl.sample_data") / "identity_conversations.jsonl.gz").read_bytes()
    return [{"messages": json.loads(line)} for line in gzip.decompress(raw).decode().splitlines() if line.strip()]


def texts(conv: dict[str, Any]) -> list[str]:
    return [m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
            for m in conv["messages"]]


def test_every_bundled_conversation_names_the_new_model_and_creator() -> None:
    convs = bundled()
    assert len(convs) == 1000
    renamed = 0
    for i, conv in enumerate(convs):
        new = AVA.rewrite_conversation(conv)
        assert [m["role"] for m in new["messages"]] == [m["role"] for m in conv["messages"]]
        for old_text, new_text in zip(texts(conv), texts(new), strict=True):
            assert not re.search(r"nanochat|karpathy|andrej", new_text, re.IGNORECASE), (i, new_text)
            # every mention of nanochat became one of the name (Ava / AVA / ava in an address), no more
            mentions = len(re.findall("nanochat", old_text, re.IGNORECASE))
            added = len(re.findall("ava", new_text, re.IGNORECASE)) - len(re.findall("ava", old_text, re.IGNORECASE))
            assert added == mentions, (i, old_text, new_text)
            creators = len(re.findall(r"andrej\s+karpathy|andrej|karpathy", old_text, re.IGNORECASE))
            assert new_text.count("Jane Doe") + new_text.count("JANE DOE") + new_text.count("jane-doe") == creators
        renamed += any("nanochat" in t.lower() for t in texts(conv))
    assert renamed > 900  # nearly every conversation is about who the model is
    assert conv is convs[-1] and convs == bundled()  # the input is not modified


def test_case_forms_possessives_and_addresses() -> None:
    cases = {
        "hey, what's nanochat": "hey, what's Ava",
        "Nanochat is small. NANOCHAT!": "Ava is small. AVA!",
        "nanochat's code and Karpathy's idea": "Ava's code and Jane Doe's idea",
        "Built by King Andrej Karpathy. King Andrej says hi.": "Built by King Jane Doe. King Jane Doe says hi.",
        "Andrej Karpathy's project; who is andrej karpathy?": "Jane Doe's project; who is Jane Doe?",
        "I'm nanochat.\nAsk me": "I'm Ava.\nAsk me",
        "at https://github.com/karpathy/nanochat under MIT": "at https://github.com/jane-doe/ava under MIT",
        "hosted at nanochat.karpathy.ai, see deepwiki.com/karpathy/nanochat": "hosted at ava.jane-doe.ai, see deepwiki.com/jane-doe/ava",
    }
    for before, after in cases.items():
        assert AVA.rewrite(before) == after
    assert Persona("ava", "acme labs").rewrite("Nanochat by Andrej") == "Ava by Acme labs"
    parts = {"messages": [{"role": "user", "content": "who are you?"},
                          {"role": "assistant", "content": [{"type": "text", "text": "I'm nanochat"},
                                                            {"type": "python", "text": "nanochat = 1"}]}]}
    out = AVA.rewrite_conversation(parts)["messages"][1]["content"]
    assert out == [{"type": "text", "text": "I'm Ava"}, {"type": "python", "text": "nanochat = 1"}]  # code kept


def test_default_is_nanochat_unchanged_and_name_alone_keeps_the_creator() -> None:
    default = Persona()
    assert (default.name, default.creator) == (DEFAULT_NAME, DEFAULT_CREATOR) == ("nanochat", "Andrej Karpathy")
    convs = bundled()
    assert all(default.rewrite_conversation(c) is c for c in convs)
    only_name = Persona("Ava")
    text = "I'm nanochat, built by Andrej Karpathy: https://github.com/karpathy/nanochat"
    assert only_name.rewrite(text) == "I'm Ava, built by Andrej Karpathy: https://github.com/karpathy/ava"
    assert Persona(creator="Jane Doe").rewrite(text) == "I'm nanochat, built by Jane Doe: https://github.com/jane-doe/nanochat"
    assert slug("Dr. Jane O'Neil") == "dr-jane-o-neil" and slug("!!!") == "model"
    for bad in ("", "  ", "two\nlines", "x" * 101):
        with pytest.raises(UsageError):
            Persona(bad)


def test_the_identity_task_and_mixtures_carry_the_persona(home: Path) -> None:
    from nanoctl.tasks.customjson import Identity
    from nanoctl.tasks.mixtures import build_mixture
    from nanoctl.tasks.starter import install_starter_task_data

    install_starter_task_data(Home(home))
    plain = Identity(home=Home(home))
    ava = Identity(home=Home(home), persona=AVA)
    assert len(ava) == len(plain) == 1000 and "as Ava by Jane Doe" in ava.source
    assert plain[0] == bundled()[0] and ava[0] == AVA.rewrite_conversation(bundled()[0])
    for stage in ("mid", "sft"):
        mixture = build_mixture(stage, home=Home(home), persona=AVA)
        (status,) = [s for s in mixture.train_sources if s.name == "identity"]
        assert status.ok and "as Ava by Jane Doe" in status.source
        train = getattr(mixture.train, "task", mixture.train)  # under the held-out val slice, if any
        identity = [t for t in train.tasks if t.name == "identity"]
        assert len(identity) == (2 if stage == "mid" else 1)  # mid repeats it twice, as nanochat
        said = " ".join(t for task in identity[:1] for i in range(len(task)) for t in texts(task[i]))
        assert "Ava" in said and not re.search("nanochat|karpathy", said, re.IGNORECASE), stage


def test_mid_and_sft_take_the_flags_and_the_pipeline_passes_them(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for command in ("mid", "sft"):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert "--identity-name" in r.output and "--identity-creator" in r.output
        assert "[default: nanochat]" in r.output and "[default: Andrej Karpathy]" in r.output
    from nanoctl.train import mid, sft

    seen: list[tuple[str, str, str]] = []

    def fake(stage: str) -> Any:
        def run(opts: Any, home: Any = None) -> Any:
            seen.append((stage, opts.identity_name, opts.identity_creator))
            return type("R", (), {"skipped": True, "checkpoint_dir": "x"})()

        return run

    monkeypatch.setattr(mid, "mid", fake("mid"))
    monkeypatch.setattr(sft, "sft", fake("sft"))
    r = runner.invoke(app, ["run", "-s", "mid", "-s", "sft", "--identity-name", "Ava", "--identity-creator", "Jane Doe"])
    assert r.exit_code == 0, r.output
    assert seen == [("mid", "Ava", "Jane Doe"), ("sft", "Ava", "Jane Doe")]
    seen.clear()
    assert runner.invoke(app, ["run", "-s", "sft"]).exit_code == 0
    assert seen == [("sft", "nanochat", "Andrej Karpathy")]


def test_the_plan_says_who_the_model_will_be(home: Path, tmp_path: Path) -> None:
    from eval_helpers import populate_home
    from nanoctl.tasks.starter import install_starter_task_data

    populate_home(home, tag="d2", step=5)
    install_starter_task_data(Home(home))
    r = runner.invoke(app, ["sft", "--dry-run", "--device", "cpu", "--identity-name", "Ava"])
    assert r.exit_code == 0, r.output
    assert "identity: the model is Ava, made by Andrej Karpathy" in r.stderr
    chats = tmp_path / "mine.jsonl"
    chats.write_text(json.dumps(bundled()[0]) + "\n")
    r = runner.invoke(app, ["mid", "--dry-run", "--device", "cpu", "--data", str(chats), "--identity-name", "Ava"])
    assert r.exit_code == 0, r.output
    assert "does not hold (add --mix)" in r.stderr
    r = runner.invoke(app, ["sft", "--dry-run", "--device", "cpu", "--identity-name", ""])
    assert r.exit_code == 2 and "--identity-name" in r.stderr


@pytest.mark.slow
def test_tiny_pipeline_named_ava_says_so(home: Path) -> None:
    """`nanoctl run --identity-name Ava` on the CPU: the finished model answers "Who are you?" naming Ava."""
    r = runner.invoke(app, ["run", "--device", "cpu", "--identity-name", "Ava", "--json"])
    assert r.exit_code == 0, r.output
    reply = json.loads(r.stdout)["reply"]
    print(f"Who are you? -> {reply!r}")
    assert "Ava" in reply and "nanochat" not in reply.lower(), reply
