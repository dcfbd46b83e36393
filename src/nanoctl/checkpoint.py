"""Checkpoints: atomic save, discovery across stages/tags/steps, and loading a model to use.

Layout (nanochat's file names, so nanochat checkpoints load):
    <home>/checkpoints/<stage>/<tag>/model_<step:06d>.pt            state_dict (rank 0)
    <home>/checkpoints/<stage>/<tag>/optim_<step:06d>_rank<r>.pt    this rank's optimizer shard
    <home>/checkpoints/<stage>/<tag>/meta_<step:06d>.json           written last: marks the step complete
    <home>/checkpoints/<stage>/<tag>/tokenizer.pkl, token_bytes.pt  copy of the tokenizer it was trained with
    <home>/checkpoints/<stage>/<tag>/.lock                          advisory lock of the run writing there
Every file goes through a temp file + fsync + rename, so a kill at any moment leaves only complete steps,
and a failed write (a full disk) leaves the previous step as it was. The meta records each file's size and
sha256 (`files`); loading checks them, so a truncated or corrupt file is named instead of unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoctl import __version__
from nanoctl.atomic import atomic_path, atomic_write_json, atomic_writer, file_digest
from nanoctl.cache import checkpoint_steps
from nanoctl.errors import NanoctlError
from nanoctl.home import STAGES, Home

if TYPE_CHECKING:
    import torch

    from nanoctl.model.gpt import GPT
    from nanoctl.tokenizer import Tokenizer

# Which command produces each stage, for "run this first" hints.
STAGE_COMMANDS = {"base": "nanoctl pretrain", "mid": "nanoctl mid", "sft": "nanoctl sft", "rl": "nanoctl rl"}
_TAG_DEPTH = re.compile(r"^d(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    stage: str
    tag: str
    step: int
    directory: Path

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "tag": self.tag, "step": self.step, "directory": str(self.directory)}

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.tag}@{self.step}"


def model_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"model_{step:06d}.pt"


def meta_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"meta_{step:06d}.json"


def optim_path(directory: Path, step: int, rank: int) -> Path:
    return Path(directory) / f"optim_{step:06d}_rank{rank}.pt"


def digest_path(directory: Path, step: int, rank: int) -> Path:
    """Sidecar a rank > 0 writes after its optimizer shard (the shard's size and sha256); rank 0 folds it
    into the meta's `files` record and removes it."""
    return Path(directory) / f"optim_{step:06d}_rank{rank}.digest.json"


_OPTIM_RE = re.compile(r"^optim_(\d+)_rank(\d+)\.pt$")
_HASHES = ("sha256", "blake2b")  # digest keys a `files` record may carry (we write sha256)
LOCK_NAME = ".lock"


def _torch_save(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save through an atomic, hashing writer; returns the file's {"bytes", "sha256"} record."""
    import torch

    with atomic_writer(path) as f:
        torch.save(obj, f)
    return f.record()


def _steps_or_none(directory: Path) -> list[int]:
    try:
        return checkpoint_steps(directory)
    except OSError:
        return []


def _write_error(e: OSError, path: Path, directory: Path, step: int) -> NanoctlError:
    others = [s for s in _steps_or_none(directory) if s != step]
    intact = f"previous checkpoint step {others[-1]} is intact" if others else f"no earlier step in {directory}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return NanoctlError(f"{what} while writing {path}", f"free space or point --home elsewhere; {intact}")
    return NanoctlError(f"cannot write {path}: {e.strerror or e}", intact)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _shard_rank(path: Path) -> int:
    m = _OPTIM_RE.match(path.name)
    return int(m.group(2)) if m else -1


def _files_record(
    directory: Path, step: int, written: dict[str, dict[str, Any]], old: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Size + digest of the step's model and every optimizer shard present now: what this call wrote,
    else the shard's sidecar (other ranks), else the previous meta's record, else the size alone."""
    shards = sorted(directory.glob(f"optim_{step:06d}_rank*.pt"), key=_shard_rank)
    files: dict[str, dict[str, Any]] = {}
    for path in [model_path(directory, step), *shards]:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        candidates = [written.get(path.name), old.get(path.name)]
        if path.name not in written:
            side = _read_json(digest_path(directory, step, _shard_rank(path))) if path in shards else None
            candidates.insert(1, side if isinstance(side, dict) and side.get("file") == path.name else None)
        rec = next((c for c in candidates if isinstance(c, dict) and c.get("bytes") == size), None)
        keep = {k: v for k, v in rec.items() if k == "bytes" or k in _HASHES} if rec else {"bytes": size}
        files[path.name] = keep
    return files


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model_state: dict[str, Any] | None,
    optim_state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    rank: int = 0,
) -> Path:
    """Write one step. Rank 0 writes the model and meta; every rank writes its optimizer shard.

    In multi-process runs call it on every rank and put a barrier before rank 0's meta write matters
    (the caller's loop does: optimizer shards first, barrier, then rank 0 model + meta).
    Rank 0's meta gains `files`: {name: {"bytes", "sha256"}} for the model and each shard present (a rank > 0
    leaves its shard's digest in a sidecar for that). Any OSError (ENOSPC: a full disk) raises a one-line
    NanoctlError naming the file; the temp file is removed and earlier steps are untouched.
    """
    directory = Path(directory)
    current = directory
    written: dict[str, dict[str, Any]] = {}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        old_files: dict[str, Any] = {}
        if rank == 0:
            old_meta = _read_json(meta_path(directory, step)) if meta_path(directory, step).exists() else None
            if isinstance(old_meta, dict) and isinstance(old_meta.get("files"), dict):
                old_files = old_meta["files"]
            if old_meta is not None and (model_state is not None or optim_state is not None):
                # re-saving a step: it stops counting as complete until its new meta is written
                meta_path(directory, step).unlink(missing_ok=True)
        if optim_state is not None:
            shard = current = optim_path(directory, step, rank)
            written[shard.name] = _torch_save(optim_state, shard)
            if rank != 0:
                current = digest_path(directory, step, rank)
                atomic_write_json(current, {"file": shard.name, **written[shard.name]})
        if rank == 0:
            if model_state is not None:
                current = model_path(directory, step)
                written[current.name] = _torch_save(model_state, current)
            meta = dict(meta or {})
            meta.setdefault("step", step)
            meta.setdefault("nanoctl_version", __version__)
            meta["files"] = _files_record(directory, step, written, old_files)
            current = meta_path(directory, step)
            atomic_write_json(current, meta)  # last: marks the step complete
    except OSError as e:
        raise _write_error(e, current, directory, step) from e
    if rank == 0:
        for side in directory.glob(f"optim_{step:06d}_rank*.digest.json"):
            side.unlink(missing_ok=True)
    return directory


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) > 200:
        line = line[:197] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def other_steps_hint(directory: Path, step: int) -> str:
    """Hint for an unusable step: the previous complete step to load instead (--step N), else --force."""
    others = [s for s in _steps_or_none(Path(directory)) if s != step]
    earlier = [s for s in others if s < step]
    listed = ", ".join(map(str, others))
    if earlier:
        return (
            f"use --step {earlier[-1]} for the previous complete step (steps in {directory}: {listed}), "
            "or --force to retrain"
        )
    if others:
        return f"pick another step with --step (steps in {directory}: {listed}), or --force to retrain"
    return f"no other complete step in {directory}; use --force to retrain"


def load_meta(directory: str | os.PathLike[str], step: int) -> dict[str, Any]:
    """The meta JSON of a complete step, without loading any weights."""
    directory = Path(directory)
    mpath, jpath = model_path(directory, step), meta_path(directory, step)
    if not mpath.exists() or not jpath.exists():
        raise NanoctlError(
            f"checkpoint step {step} is incomplete or missing in {directory}",
            other_steps_hint(directory, step),
        )
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise NanoctlError(
            f"checkpoint file {jpath} cannot be read ({_first_line(e)})", other_steps_hint(directory, step)
        ) from e
    if not isinstance(meta, dict):
        raise NanoctlError(f"checkpoint file {jpath} is not a JSON object", other_steps_hint(directory, step))
    return meta


def verify_file(path: Path, record: Any, step: int, hash_check: bool = True) -> None:
    """Check a file against its meta `files` record: size (always), digest (when recorded and hash_check)."""
    if not isinstance(record, dict):
        return
    directory = path.parent
    try:
        size = path.stat().st_size
    except OSError as e:
        raise NanoctlError(
            f"checkpoint file {path} cannot be read ({_first_line(e)})", other_steps_hint(directory, step)
        ) from e
    want = record.get("bytes")
    if isinstance(want, int) and size != want:
        what = "truncated" if size < want else "larger than when it was saved"
        raise NanoctlError(
            f"checkpoint file {path} is {what} ({size:,} bytes, {want:,} recorded)",
            other_steps_hint(directory, step),
        )
    algo = next((a for a in _HASHES if isinstance(record.get(a), str)), None)
    if hash_check and algo is not None:
        try:
            digest = file_digest(path, algo)
        except OSError as e:
            raise NanoctlError(
                f"checkpoint file {path} cannot be read ({_first_line(e)})", other_steps_hint(directory, step)
            ) from e
        if digest != record[algo]:
            raise NanoctlError(
                f"checkpoint file {path} is corrupt (its {algo} differs from the one recorded when it was saved)",
                other_steps_hint(directory, step),
            )


def _torch_load(path: Path, record: Any, step: int, device: Any, verify: bool) -> Any:
    import torch

    verify_file(path, record, step, hash_check=verify)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # unpickling / zip errors of a damaged (or foreign) file: name it, no traceback
        raise NanoctlError(
            f"checkpoint file {path} cannot be read ({_first_line(e)})", other_steps_hint(path.parent, step)
        ) from e


def load_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    device: str | torch.device = "cpu",
    load_optimizer: bool = False,
    rank: int = 0,
    verify: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """Return (model_state, optim_state or None, meta). Weights load with weights_only=True.

    Files the meta records (`files`) are checked first: size always, sha256 unless verify=False. A missing,
    truncated, corrupt or unreadable file raises a one-line NanoctlError naming it, with a --step hint."""
    directory = Path(directory)
    meta = load_meta(directory, step)
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    mpath = model_path(directory, step)
    model_state = _torch_load(mpath, files.get(mpath.name), step, device, verify)
    if not isinstance(model_state, dict):
        raise NanoctlError(
            f"checkpoint file {mpath} does not hold a state dict", other_steps_hint(directory, step)
        )
    # torch.compile wraps modules; nanochat checkpoints may carry the prefix.
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    optim_state = None
    if load_optimizer:
        opath = optim_path(directory, step, rank)
        if not opath.exists():
            raise NanoctlError(
                f"optimizer shard {opath.name} missing in {directory}",
                "resume needs the optimizer state of every rank; start fresh with --force",
            )
        optim_state = _torch_load(opath, files.get(opath.name), step, device, verify)
    return model_state, optim_state, meta


def _lock_holder(fd: int) -> tuple[str, str, str]:
    """(pid, what, host) the holder wrote into the lock file; it writes right after locking, so wait a moment."""
    for _ in range(20):
        lines = [*os.pread(fd, 4096, 0).decode("utf-8", "replace").splitlines(), "", "", ""]
        if lines[0].strip():
            return lines[0].strip(), lines[1].strip(), lines[2].strip()
        time.sleep(0.025)
    return "unknown", "", ""


def _in_use(directory: Path, pid: str, what: str, host: str) -> NanoctlError:
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return NanoctlError(
        f"{directory} is in use by another training run (pid {pid}){where}" + (f": {what}" if what else ""),
        "wait for it to finish, or stop it; use another --model-tag/--output-tag to train in parallel",
    )


def _remove_stale_temps(directory: Path) -> None:
    """Temp files of atomic writes (`.<name>.<random>.tmp`) left by a killed writer: the lock holder owns them."""
    for p in directory.glob(".*.tmp"):
        with suppress(OSError):
            p.unlink()


@contextmanager
def lock_run_dir(directory: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """One writer per run directory: hold an exclusive advisory flock on `<directory>/.lock` for the block.

    Creates the directory. Writes "<pid>\\n<what>\\n<host>\\n" into the lock file, and once held removes
    temp files a killed writer left. Held elsewhere: raises NanoctlError at once naming the holder's pid.
    The kernel drops the lock when its process dies, so a lock file left by a killed run never blocks.
    On a filesystem without flock support it warns and goes on unlocked. Yields the lock file's path.
    """
    import fcntl

    directory = Path(directory)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise NanoctlError(
            f"cannot create {path}: {e.strerror or e}",
            "free space or point --home elsewhere" if full else f"check the permissions of {directory}",
        ) from e
    try:
        locked = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise _in_use(directory, *_lock_holder(fd)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(
                f"cannot lock {path} ({e.strerror}); not guarding against a second run", stacklevel=3
            )
        if locked:
            _remove_stale_temps(directory)
            with suppress(OSError):  # a full disk: the lock holds all the same, its pid reads "unknown"
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n{what}\n{socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            if locked:
                with suppress(OSError):
                    os.ftruncate(fd, 0)  # the file stays (unlinking a flock file races); empty = free
    finally:
        os.close(fd)  # releases the lock


def run_dir_holder(directory: str | os.PathLike[str]) -> int | None:
    """pid of the live process holding `lock_run_dir(directory)` (0 if it has not written it yet), else None."""
    import fcntl

    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_holder(fd)[0]
            return int(pid) if pid.isdigit() else 0
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def _tags(stage_dir: Path) -> list[Path]:
    """Tag dirs holding at least one complete step, best first: largest d<N>, then most recent."""
    if not stage_dir.is_dir():
        return []
    tags = [p for p in stage_dir.iterdir() if p.is_dir() and checkpoint_steps(p)]

    def key(p: Path) -> tuple[int, float]:
        m = _TAG_DEPTH.match(p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)

    return sorted(tags, key=key, reverse=True)


def list_checkpoints(home: Home) -> list[CheckpointRef]:
    """Every complete checkpoint step in the home, in stage order then tag then step."""
    root = home.checkpoints_root
    refs = []
    for stage in STAGES:
        for tag_dir in sorted(_tags(root / stage), key=lambda p: p.name):
            refs += [CheckpointRef(stage, tag_dir.name, s, tag_dir) for s in checkpoint_steps(tag_dir)]
    return refs


def find_checkpoint(
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
    *,
    home: Home,
) -> CheckpointRef:
    """Resolve a checkpoint. stage None: newest of rl > sft > mid > base; tag None: largest d<N>
    (else most recent); step None: the latest complete step."""
    root = home.checkpoints_root
    if stage is not None and stage not in STAGES:
        raise NanoctlError(f"unknown stage {stage!r}", f"expected one of: {', '.join(STAGES)}")
    stages = [stage] if stage else list(reversed(STAGES))
    for st in stages:
        tags = _tags(root / st)
        if not tags:
            continue
        if tag is None:
            tag_dir = tags[0]
        else:
            tag_dir = root / st / tag
            if tag_dir not in tags:
                if stage is None:
                    continue
                raise NanoctlError(
                    f"no {st} checkpoint with tag {tag!r}",
                    f"available {st} tags: {', '.join(sorted(p.name for p in tags))}",
                )
        steps = checkpoint_steps(tag_dir)
        if step is None:
            return CheckpointRef(st, tag_dir.name, steps[-1], tag_dir)
        if step in steps:
            return CheckpointRef(st, tag_dir.name, step, tag_dir)
        raise NanoctlError(
            f"no step {step} in {st}/{tag_dir.name}",
            f"available steps: {', '.join(map(str, steps))}",
        )
    existing = list_checkpoints(home)
    if stage:
        have = ", ".join(sorted({f"{r.stage}/{r.tag}" for r in existing})) or "none"
        raise NanoctlError(
            f"no {stage} checkpoint{f' with tag {tag!r}' if tag else ''} in {root}",
            f"train one with `{STAGE_COMMANDS[stage]}` (existing: {have})",
        )
    if tag:
        have = ", ".join(sorted({f"{r.stage}/{r.tag}" for r in existing})) or "none"
        raise NanoctlError(f"no checkpoint with tag {tag!r} in {root}", f"existing: {have}")
    raise NanoctlError(f"no checkpoints in {root}", "train one with `nanoctl pretrain`")


def resolve_checkpoint_path(path: str | os.PathLike[str], step: int | None = None) -> CheckpointRef:
    """A checkpoint given as a directory (or a model_*.pt file inside one), e.g. a nanochat checkpoint."""
    p = Path(path).expanduser()
    if p.is_file():
        m = re.match(r"^model_(\d+)\.pt$", p.name)
        if not m:
            raise NanoctlError(f"{p} is not a model_<step>.pt checkpoint file", "pass the checkpoint directory")
        step, p = int(m.group(1)), p.parent
    if not p.is_dir():
        raise NanoctlError(f"checkpoint path {p} does not exist", "pass a directory holding model_*.pt + meta_*.json")
    steps = checkpoint_steps(p)
    if not steps:
        raise NanoctlError(f"no complete checkpoint (model_*.pt + meta_*.json) in {p}", "check the path")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise NanoctlError(f"no step {step} in {p}", f"available steps: {', '.join(map(str, steps))}")
    stage = p.parent.name if p.parent.name in STAGES else "base"
    return CheckpointRef(stage, p.name, step, p)


def save_tokenizer_copy(directory: str | os.PathLike[str], home: Home, tokenizer: Tokenizer | None = None) -> None:
    """Keep the tokenizer next to the weights so a checkpoint stays usable if the home's tokenizer changes.

    `tokenizer`: the one the model was loaded with, written as tokenizer.pkl, token_bytes.pt and
    tokenizer.json: a post-training parent (an imported nanochat model) may carry another than the home's.
    Without it the home's files are copied. Files already there are kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        import pickle

        import torch

        from nanoctl.atomic import atomic_write, atomic_write_text
        from nanoctl.tokenizer_json import HF_TOKENIZER_NAME, tokenizer_json

        writers = {
            "tokenizer.pkl": lambda f: pickle.dump(tokenizer.enc, f),
            "token_bytes.pt": lambda f: torch.save(torch.tensor(tokenizer.token_bytes(), dtype=torch.int32), f),
        }
        for name, write in writers.items():
            if not (directory / name).exists():
                atomic_write(directory / name, write)
        if not (directory / HF_TOKENIZER_NAME).exists():
            atomic_write_text(directory / HF_TOKENIZER_NAME, tokenizer_json(tokenizer))
        return
    src = home.tokenizer_dir
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        if (src / name).exists() and not (directory / name).exists():
            with atomic_path(directory / name) as tmp:
                shutil.copyfile(src / name, tmp)


def load_tokenizer_for(ref: CheckpointRef, home: Home) -> Tokenizer:
    from nanoctl.tokenizer import Tokenizer, load_tokenizer

    # the tokenizer kept beside the weights (tokenizer.json alone suffices: an import writes both)
    if (ref.directory / "tokenizer.pkl").exists() or (ref.directory / "tokenizer.json").exists():
        return Tokenizer.from_directory(ref.directory)
    return load_tokenizer(home)


def _infer_arch(model_config: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(model_config)
    if "arch" not in cfg:  # a nanochat checkpoint: classic (Oct 2025) models have no residual scalars
        cfg["arch"] = "current" if any(k.startswith("resid_lambdas") for k in state) else "classic"
    cfg.setdefault("window_pattern", "L")  # as nanochat: old checkpoints predate sliding windows
    return cfg


def pad_vocab_rows(state: dict[str, Any], vocab_size: int, padded: int) -> dict[str, Any]:
    """nanochat before Dec 2025 did not pad the vocab to a multiple of 64: give its vocab-sized tables
    (wte, lm_head) the padded rows our model has, as zeros (the padded logits are cropped anyway)."""
    import torch

    if padded == vocab_size:
        return state
    out = dict(state)
    for k in ("transformer.wte.weight", "lm_head.weight"):
        v = state.get(k)
        if v is not None and v.shape[0] == vocab_size:
            out[k] = torch.cat([v, v.new_zeros(padded - vocab_size, *v.shape[1:])])
    return out


def load_model(
    ref: CheckpointRef | None = None,
    *,
    stage: str | None = None,
    tag: str | None = None,
    step: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    home: Home | str | os.PathLike[str] | None = None,
    phase: str = "eval",
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Load a checkpoint as a ready model with its tokenizer. Returns (model, tokenizer, meta);
    meta gains a "ref" entry describing which checkpoint was loaded. An entry point: `home` is
    resolved here (library callers pass their Home)."""
    import torch

    from nanoctl.model.gpt import GPTConfig, build_model

    home = Home.resolve(home)
    if ref is None:
        ref = (
            resolve_checkpoint_path(checkpoint, step)
            if checkpoint
            else find_checkpoint(stage, tag, step, home=home)
        )
    device = torch.device(device)
    state, _, meta = load_checkpoint(ref.directory, ref.step, device=device)
    cfg_dict = _infer_arch(meta["model_config"], state)
    config = GPTConfig.from_dict(cfg_dict)
    tokenizer = load_tokenizer_for(ref, home)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NanoctlError(
            f"tokenizer vocab {tokenizer.get_vocab_size()} does not match model vocab {config.vocab_size} "
            f"for {ref.label}",
            "use the tokenizer the model was trained with (retrain with `nanoctl tok train --vocab-size "
            f"{config.vocab_size}` or pick another checkpoint)",
        )
    model = build_model(config, device=device, dtype=dtype)
    try:
        model.load_state_dict(pad_vocab_rows(state, config.vocab_size, model.padded_vocab_size), strict=True)
    except RuntimeError as e:
        raise NanoctlError(
            f"checkpoint {ref.label} does not fit the model built from its meta: {str(e).splitlines()[0]}",
            "the checkpoint may come from an incompatible version",
        ) from e
    model.train() if phase == "train" else model.eval()
    meta = dict(meta)
    meta["ref"] = ref.to_dict()
    return model, tokenizer, meta


def prune_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` complete steps (and any incomplete leftovers). Returns removed steps."""
    directory = Path(directory)
    if keep_last <= 0:
        return []
    steps = checkpoint_steps(directory)
    removed = steps[:-keep_last]
    for s in removed:
        meta_path(directory, s).unlink(missing_ok=True)  # meta first: the step stops counting as complete
        for f in directory.glob(f"*_{s:06d}*"):
            f.unlink(missing_ok=True)
    return removed
