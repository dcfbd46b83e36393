"""`nanoctl import nanochat DIR`: bring nanochat checkpoints and their tokenizer into the home.

DIR is a nanochat base directory (`~/.cache/nanochat`: `base_checkpoints/<tag>/`, `mid_checkpoints/`,
`chatsft_checkpoints/`, `chatrl_checkpoints/`, `tokenizer/`), one of its stage directories, or a single
checkpoint directory (`model_<step>.pt` + `meta_<step>.json`). Each complete step lands in
`<home>/checkpoints/<stage>/<tag>/` under nanochat's file names, so every command that reads a checkpoint
(chat, serve, eval, sft, rl, export) uses it as it is.

The weights file is copied (or linked with `link`: a hard link, else a symlink, else a copy) and never
rewritten: nanochat's `_orig_mod.` key prefixes are stripped when it is loaded (checkpoint.load_checkpoint).
Our meta is written last, next to it: nanochat's meta (whole under `nanochat_meta`; at the top the fields
our stages read), the validated `model_config` with its `arch`, `final` (a stage writing there refuses
instead of resuming), the file's size and sha256 (`files`, computed from the source when linked, so load-time checks
hold), and `imported_from` (source path, nanochat stage directory, tag, step, how it came). The tokenizer
(a pickled tiktoken Encoding) goes next to the weights together with a `tokenizer.json`, so later use
needs no pickle, and into `<home>/tokenizer/` when the home has none.

Before anything is written, every step is checked: its model_config keys (an unknown key is named: a fork
with features nanoctl lacks), its state dict against the model built from that config, and the
tokenizer's vocab. Re-running the same import changes nothing; a destination step that holds something
else is an error unless `force`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl.cache import checkpoint_steps
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import STAGES, Home
from nanoctl.options import DATA, OUTPUT, START, option

if TYPE_CHECKING:
    from nanoctl.tokenizer import Tokenizer

# nanochat's stage directories (checkpoint_manager.load_model) and the stage each one is here.
NANOCHAT_STAGE_DIRS = {
    "base_checkpoints": "base",
    "mid_checkpoints": "mid",
    "chatsft_checkpoints": "sft",
    "chatrl_checkpoints": "rl",
}
# The model_config keys nanochat writes: classic (Oct 2025) the first six, current adds window_pattern.
NANOCHAT_CONFIG_KEYS = (
    "sequence_len",
    "vocab_size",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "window_pattern",
)
# nanochat meta fields kept at the top level of ours (our stages read some: mid reads device_batch_size);
# the whole nanochat meta is kept under "nanochat_meta".
LIFTED_META = ("user_config", "val_bpb", "val_loss", "device_batch_size", "max_seq_len", "total_batch_size")


@dataclass
class ImportNanochatOptions:
    """Options of `nanoctl import nanochat DIR`."""

    link: bool = option(
        False,
        help="Link the weights instead of copying them: a hard link, else a symlink, else a copy (noted).",
        panel=OUTPUT,
    )
    force: bool = option(False, help="Replace destination steps that hold something else.", panel=OUTPUT)
    stage: str | None = option(
        None,
        help="Import only this stage: base, mid, sft, rl. A single checkpoint directory outside nanochat's"
        " layout needs it (inside, its parent's name says: chatsft_checkpoints = sft).",
        panel=START,
    )
    tag: str | None = option(None, help="Import only this tag (e.g. d20); it keeps its name.", panel=START)
    step: int | None = option(None, help="Import only this step (unset: every complete step).", panel=START)
    tokenizer: str | None = option(
        None,
        help="nanochat tokenizer directory or tokenizer.pkl (unset: DIR/tokenizer, or the one beside the"
        " checkpoint's stage directory).",
        panel=DATA,
    )
    optimizer: bool = option(
        False,
        help="Also import the optimizer shards optim_<step>_rank<r>.pt (nanoctl trains fresh optimizer"
        " state from an imported model; they only cost disk).",
        panel=DATA,
    )

    def validate(self) -> None:
        if self.stage is not None and self.stage not in STAGES:
            raise UsageError(f"--stage {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.step is not None and self.step < 0:
            raise UsageError(f"--step {self.step} must be >= 0")


@dataclass
class _Step:
    """One source step and where it goes."""

    stage: str
    tag: str
    step: int
    source: Path  # the nanochat checkpoint directory
    nanochat_dir: str | None  # its stage directory's name (base_checkpoints, ...), when it has one
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.tag}@{self.step}"


# -- finding what to import ------------------------------------------------------------------------------


def _checkpoint_dirs(src: Path, opts: ImportNanochatOptions) -> list[tuple[str, str, Path, str | None]]:
    """(stage, tag, directory, nanochat stage dir name) of every checkpoint directory in `src`."""
    found: list[tuple[str, str, Path, str | None]] = []
    if checkpoint_steps(src):  # a single checkpoint directory
        stage = opts.stage or NANOCHAT_STAGE_DIRS.get(src.parent.name)
        if stage is None:
            raise UsageError(
                f"cannot tell which stage {src} holds (its parent is not one of nanochat's "
                f"{', '.join(NANOCHAT_STAGE_DIRS)})",
                "pass --stage base|mid|sft|rl",
            )
        parent = src.parent.name if src.parent.name in NANOCHAT_STAGE_DIRS else None
        found.append((stage, src.name, src, parent))
    else:
        stage_dirs = (
            [src] if src.name in NANOCHAT_STAGE_DIRS else [src / name for name in NANOCHAT_STAGE_DIRS]
        )
        for stage_dir in stage_dirs:
            if not stage_dir.is_dir():
                continue
            for tag_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir() and checkpoint_steps(p)):
                found.append((NANOCHAT_STAGE_DIRS[stage_dir.name], tag_dir.name, tag_dir, stage_dir.name))
        if opts.stage is not None:
            found = [f for f in found if f[0] == opts.stage]
    if opts.tag is not None:
        tags = sorted({f[1] for f in found})
        found = [f for f in found if f[1] == opts.tag]
        if not found:
            raise NanoctlError(
                f"no nanochat checkpoint with tag {opts.tag!r} in {src}",
                f"tags there: {', '.join(tags) or 'none'}",
            )
    if not found:
        raise NanoctlError(
            f"no nanochat checkpoints in {src}",
            "pass a nanochat base directory (holding base_checkpoints/, chatsft_checkpoints/, ...) or a "
            "checkpoint directory holding model_<step>.pt + meta_<step>.json",
        )
    return found


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NanoctlError(
            f"cannot read nanochat meta {path} ({type(e).__name__}: {e})",
            "it must be the JSON nanochat wrote next to the model file",
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanoctlError(
            f"nanochat meta {path} has no model_config object",
            "it must be the meta_<step>.json nanochat wrote next to the model file",
        )
    return meta


def _check_model_config(cfg: dict[str, Any], path: Path) -> None:
    """Every key must be one of nanochat's: GPTConfig.from_dict would drop an unknown one silently, and our
    own extensions (MoE, MLA) are no nanochat architecture."""
    unknown = [k for k in cfg if k not in NANOCHAT_CONFIG_KEYS]
    if unknown:
        raise NanoctlError(
            f"{path}: model_config key {unknown[0]!r} is not one nanochat's GPTConfig has"
            + (f" (also {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""),
            f"nanoctl imports models built from {', '.join(NANOCHAT_CONFIG_KEYS)}; this checkpoint comes from "
            "a nanochat fork with features nanoctl does not implement",
        )
    missing = [k for k in NANOCHAT_CONFIG_KEYS[:6] if k not in cfg]
    if missing:
        raise NanoctlError(
            f"{path}: model_config has no {missing[0]!r}",
            "it must be the meta_<step>.json nanochat wrote next to the model file",
        )


def _load_state(path: Path) -> dict[str, Any]:
    """The state dict, memory-mapped (only shapes are looked at), `_orig_mod.` prefixes stripped."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NanoctlError(
            f"cannot read nanochat weights {path} ({type(e).__name__}: {str(e).splitlines()[0]})",
            "it must be the model_<step>.pt nanochat wrote (a state dict)",
        ) from None
    if not isinstance(state, dict):
        raise NanoctlError(f"{path} does not hold a state dict", "pass nanochat's model_<step>.pt")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def _check_state(state: dict[str, Any], config: Any, path: Path) -> None:
    """The weights must fit the model the config builds: same keys, same shapes (checked on the meta device)."""
    import torch

    from nanoctl.model.gpt import GPT

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    arch = f"{config.arch} arch"
    if missing or extra:
        what = f"has no {missing[0]!r}" if missing else f"has an unexpected {extra[0]!r}"
        raise NanoctlError(
            f"{path} {what} for the {arch} model its meta describes "
            f"({len(missing)} missing, {len(extra)} unexpected keys)",
            "nanoctl loads nanochat's classic (Oct 2025) and current architectures; this checkpoint comes from "
            "another nanochat version or a fork",
        )
    unpadded = {"transformer.wte.weight", "lm_head.weight"}  # old nanochat: vocab rows, padded on load
    for k, shape in want.items():
        got = tuple(state[k].shape)
        if got != shape and not (k in unpadded and got == (config.vocab_size, *shape[1:])):
            raise NanoctlError(
                f"{path}: {k} has shape {got}, the {arch} model its meta describes needs {shape}",
                "the weights and meta_<step>.json do not belong together, or the checkpoint comes from a fork",
            )


def _plan(src: Path, opts: ImportNanochatOptions) -> list[_Step]:
    from nanoctl.checkpoint import _infer_arch, meta_path, model_path
    from nanoctl.model.gpt import GPTConfig

    steps: list[_Step] = []
    dirs = _checkpoint_dirs(src, opts)
    for stage, tag, directory, nanochat_dir in dirs:
        numbers = checkpoint_steps(directory)
        if opts.step is not None:
            if opts.step not in numbers:
                if len(dirs) == 1:
                    raise NanoctlError(
                        f"no step {opts.step} in {directory}", f"steps there: {', '.join(map(str, numbers))}"
                    )
                continue
            numbers = [opts.step]
        for n in numbers:
            meta = _read_meta(meta_path(directory, n))
            _check_model_config(meta["model_config"], meta_path(directory, n))
            state = _load_state(model_path(directory, n))
            cfg = _infer_arch(meta["model_config"], state)
            try:
                config = GPTConfig.from_dict(cfg)
            except NanoctlError as e:
                raise NanoctlError(f"{meta_path(directory, n)}: {e.message}", e.hint) from None
            _check_state(state, config, model_path(directory, n))
            steps.append(_Step(stage, tag, n, directory, nanochat_dir, meta, config.to_dict()))
    if not steps:
        raise NanoctlError(
            f"no step {opts.step} in any nanochat checkpoint in {src}", "drop --step or pick another"
        )
    return steps


def _tokenizer_source(src: Path, steps: list[_Step], opts: ImportNanochatOptions) -> Path:
    """The nanochat tokenizer directory: --tokenizer, else DIR/tokenizer, else beside the weights, else the
    base directory's tokenizer/ above a checkpoint (<base>/<stage>_checkpoints/<tag>/)."""
    if opts.tokenizer:
        p = Path(opts.tokenizer).expanduser()
        p = p.parent if p.is_file() else p
        if not (p / "tokenizer.pkl").is_file():
            raise UsageError(
                f"--tokenizer {opts.tokenizer}: no tokenizer.pkl there",
                "pass nanochat's tokenizer directory (holding tokenizer.pkl) or the file itself",
            )
        return p
    candidates = [src / "tokenizer", src, src.parent / "tokenizer", src.parent.parent / "tokenizer"]
    candidates += [s.source for s in steps]
    for p in candidates:
        if (p / "tokenizer.pkl").is_file():
            return p
    raise NanoctlError(
        f"no nanochat tokenizer (tokenizer/tokenizer.pkl) found for {src}",
        "pass --tokenizer DIR: the tokenizer/ directory of the nanochat base directory",
    )


# What a pickled tiktoken Encoding may reference. Anything else would run code while unpickling: a foreign
# file is refused instead (the copies we keep are then the checked bytes).
PICKLE_GLOBALS = {("tiktoken.core", "Encoding"), ("_codecs", "encode"), ("builtins", "bytes")}


def _load_tokenizer(tok_dir: Path) -> Tokenizer:
    """nanochat's tokenizer.pkl, unpickled with only the classes a tiktoken Encoding needs."""
    import pickle

    import tiktoken

    from nanoctl.tokenizer import Tokenizer

    path = tok_dir / "tokenizer.pkl"

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in PICKLE_GLOBALS:
                raise NanoctlError(
                    f"{path} references {module}.{name}: it is not a plain pickled tiktoken Encoding",
                    "refusing to unpickle it; pass nanochat's own tokenizer with --tokenizer DIR",
                )
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f:
            enc = Restricted(f).load()
    except NanoctlError:
        raise
    except Exception as e:  # truncated or not a pickle
        raise NanoctlError(
            f"{path} is not a valid tokenizer pickle ({type(e).__name__}: {e})",
            "pass nanochat's tokenizer directory with --tokenizer DIR",
        ) from None
    if not isinstance(enc, tiktoken.Encoding) or "<|bos|>" not in enc._special_tokens:
        raise NanoctlError(
            f"{path} is not a nanochat tokenizer (a tiktoken Encoding with <|bos|>)",
            "pass nanochat's tokenizer directory with --tokenizer DIR",
        )
    return Tokenizer(enc, "<|bos|>")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.pkl").is_file() or (directory / "tokenizer.json").is_file()


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return (
        a.get_pattern() == b.get_pattern()
        and a.get_mergeable_ranks() == b.get_mergeable_ranks()
        and a.enc._special_tokens == b.enc._special_tokens
    )


# -- writing ---------------------------------------------------------------------------------------------


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _put(src: Path, dst: Path, link: bool) -> tuple[dict[str, Any], str]:
    """Copy (hashing as it goes) or link `src` to `dst` atomically; ({"bytes", "sha256"}, how)."""
    from nanoctl.atomic import HASH, atomic_writer, file_digest

    if link:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")  # renamed over dst: never half there
        for how in ("hardlink", "symlink"):
            tmp.unlink(missing_ok=True)
            try:
                if how == "hardlink":
                    os.link(src, tmp)
                else:
                    os.symlink(src.resolve(), tmp)
                os.replace(tmp, dst)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                continue
            # the digest comes from the source's bytes, which are the link's: load-time checks hold
            return {"bytes": src.stat().st_size, HASH: file_digest(src)}, how
    with open(src, "rb") as fin, atomic_writer(dst) as fout:
        shutil.copyfileobj(fin, fout, 8 << 20)
    return fout.record(), "copy"


def _existing(step: _Step, home: Home) -> str:
    """What the destination holds at this step: "new" (nothing), "unchanged" (this import, from the same
    source file, or a moved copy with the same sha256) or "conflict" (anything else)."""
    from nanoctl.atomic import file_digest
    from nanoctl.checkpoint import meta_path, model_path

    dest = home.checkpoint_dir(step.stage, step.tag)
    mp, dst_model = meta_path(dest, step.step), model_path(dest, step.step)
    if not mp.exists() and not dst_model.exists():
        return "new"
    try:
        meta = json.loads(mp.read_text())
        origin, record = meta["imported_from"], meta["files"][dst_model.name]
        src_model = model_path(step.source, step.step)
        if not dst_model.exists() or dst_model.stat().st_size != record["bytes"]:
            return "conflict"
        if origin["source"] == str(step.source) and origin["model"] == _stat(src_model):
            return "unchanged"
        # moved or copied elsewhere since: the same bytes are the same import (one read of the source)
        same = src_model.stat().st_size == record["bytes"] and file_digest(src_model) == record.get("sha256")
        return "unchanged" if same else "conflict"
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, or not an import: something else
        return "conflict"


def _write_step(
    s: _Step, dest: Path, tok: Tokenizer, tok_src: Path, opts: ImportNanochatOptions, home: Home
) -> tuple[str, list[str]]:
    """Put one step's files into `dest`, then its meta (last: it marks the step complete); (method, notes)."""
    from nanoctl import __version__
    from nanoctl.atomic import atomic_write_json
    from nanoctl.checkpoint import meta_path, model_path, save_tokenizer_copy
    from nanoctl.tokenizer import Tokenizer

    meta_path(dest, s.step).unlink(missing_ok=True)  # a replaced step stops counting as complete first
    names = [model_path(s.source, s.step)]
    if opts.optimizer:
        names += sorted(s.source.glob(f"optim_{s.step:06d}_rank*.pt"))
    else:  # a replaced step's shards are not the import's
        for stale in dest.glob(f"optim_{s.step:06d}_rank*.pt"):
            stale.unlink()
    files: dict[str, dict[str, Any]] = {}
    methods: set[str] = set()
    try:
        for path in names:
            files[path.name], how = _put(path, dest / path.name, opts.link)
            methods.add(how)
        if _has_tokenizer(dest) and not _same_tokenizer(Tokenizer.from_directory(dest), tok):  # --force
            for name in ("tokenizer.pkl", "token_bytes.pt", "tokenizer.json"):
                (dest / name).unlink(missing_ok=True)
        # written from the checked Encoding (never the foreign bytes), with tokenizer.json: no pickle needed
        save_tokenizer_copy(dest, home, tok)
    except OSError as e:
        raise NanoctlError(
            f"cannot write into {dest}: {e.strerror or e}",
            "free space or point --home elsewhere; nothing of this step counts as imported",
        ) from e
    notes = []
    if opts.link and "copy" in methods:
        notes.append(f"{s.label}: could not link {s.source} (neither hard link nor symlink): copied")
    elif "symlink" in methods:
        notes.append(f"{s.label}: symlinked (another filesystem); it breaks if {s.source} moves")
    method = "copy" if methods == {"copy"} else sorted(methods)[0]
    meta = {
        "step": s.step,
        "stage": s.stage,
        "model_config": s.config,
        **{k: s.meta[k] for k in LIFTED_META if k in s.meta},
        "parent": None,  # nanochat records no lineage between its stages
        "final": True,  # a finished checkpoint: a stage writing here refuses it instead of resuming it
        "nanoctl_version": __version__,
        "imported_from": {
            "kind": "nanochat",
            "source": str(s.source),
            "nanochat_dir": s.nanochat_dir,
            "tag": s.tag,
            "step": s.step,
            "model": _stat(model_path(s.source, s.step)),
            "method": method,
            "tokenizer": str(tok_src),
        },
        "nanochat_meta": s.meta,
        "files": files,
    }
    atomic_write_json(meta_path(dest, s.step), meta)
    return method, notes


def import_nanochat(
    src: str | os.PathLike[str],
    opts: ImportNanochatOptions,
    home: Home | str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Import nanochat checkpoints (and their tokenizer) from `src` into the home; see the module docstring.

    Returns a summary: source, tokenizer {source, home}, checkpoints [{stage, tag, step, directory, arch,
    status (imported | unchanged | replaced), method (copy | hardlink | symlink)}], notes. An entry point:
    `home` is resolved here."""
    from nanoctl.checkpoint import lock_run_dir
    from nanoctl.tokenizer import Tokenizer

    home = Home.resolve(home)
    opts.validate()
    root = Path(src).expanduser()
    if not root.is_dir():
        raise UsageError(
            f"{root} is not a directory",
            "pass a nanochat base directory (e.g. ~/.cache/nanochat) or a checkpoint directory",
        )
    root = root.resolve()
    steps = _plan(root, opts)
    tok_src = _tokenizer_source(root, steps, opts)
    tok = _load_tokenizer(tok_src)
    for s in steps:
        if s.config["vocab_size"] != tok.get_vocab_size():
            raise NanoctlError(
                f"tokenizer {tok_src / 'tokenizer.pkl'} has {tok.get_vocab_size():,} tokens, {s.label} was trained "
                f"with {s.config['vocab_size']:,}",
                "pass the tokenizer the model was trained with: --tokenizer DIR",
            )

    # Check every destination before writing anything, so a refused import leaves the home as it was.
    states = {id(s): _existing(s, home) for s in steps}
    conflicts = [s for s in steps if states[id(s)] == "conflict"]
    if conflicts and not opts.force:
        c = conflicts[0]
        raise NanoctlError(
            f"{home.checkpoint_dir(c.stage, c.tag)} already holds step {c.step}, not this import of {c.source}"
            + (f" (and {len(conflicts) - 1} more steps)" if len(conflicts) > 1 else ""),
            "pass --force to replace it, or import into another --home",
        )
    for directory in {home.checkpoint_dir(s.stage, s.tag) for s in steps}:
        if _has_tokenizer(directory) and not opts.force:
            if not _same_tokenizer(Tokenizer.from_directory(directory), tok):
                raise NanoctlError(
                    f"{directory} holds another tokenizer than {tok_src}",
                    "pass --force to replace it, or import into another --home",
                )

    notes: list[str] = []
    results: list[dict[str, Any]] = []
    for s in steps:
        status = states[id(s)]
        dest = home.checkpoint_dir(s.stage, s.tag)
        entry = {
            "stage": s.stage,
            "tag": s.tag,
            "step": s.step,
            "directory": str(dest),
            "arch": s.config["arch"],
        }
        if status == "unchanged":
            results.append({**entry, "status": "unchanged", "method": None})
            continue
        with lock_run_dir(dest, f"nanoctl import nanochat {s.source}"):  # not beside a training run
            method, note = _write_step(s, dest, tok, tok_src, opts, home)
        notes += note
        results.append(
            {**entry, "status": "replaced" if status == "conflict" else "imported", "method": method}
        )

    home_tok = "written"
    if _has_tokenizer(home.tokenizer_dir):
        home_tok = "same" if _same_tokenizer(Tokenizer.from_directory(home.tokenizer_dir), tok) else "kept"
        if home_tok == "kept":
            notes.append(
                f"the home's tokenizer ({home.tokenizer_dir}) differs from the imported one and was kept; the "
                "imported checkpoints carry their own (pretraining from scratch still uses the home's)"
            )
    else:
        tok.save(home.tokenizer_dir)
    return {
        "source": str(root),
        "home": str(home.root),
        "tokenizer": {"source": str(tok_src), "home": home_tok},
        "checkpoints": results,
        "notes": notes,
    }
