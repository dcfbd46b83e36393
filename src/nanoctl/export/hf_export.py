"""`nanoctl export hf`, library side: a checkpoint as a transformers directory.

Writes config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
special_tokens_map.json into a temp directory beside OUTDIR, then renames it into place. The classic arch
loads as transformers' own NanoChatForCausalLM; the current arch (value embeddings, sliding windows,
smear, backout, residual lambdas) and the deepseek arch (MLA, DeepSeekMoE) also get
configuration_nanoctl.py + modeling_nanoctl.py and an auto_map (load with trust_remote_code=True). No torch at import (the CLI reads ExportHFOptions).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.options import START, option

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ExportHFOptions:
    """Everything `nanoctl export hf` takes besides OUTDIR; the CLI flags are derived from these fields."""

    stage: str | None = option(
        None, help="base|mid|sft|rl (default: newest of rl > sft > mid > base).", panel=START
    )
    tag: str | None = option(None, help="Model tag, e.g. d20 (default: largest d<N>).", panel=START)
    step: int | None = option(None, help="Checkpoint step (default: latest).", panel=START)
    dtype: str = option("fp32", help="fp32|bf16|fp16: the dtype of the saved weights.")
    force: bool = option(False, help="Replace OUTDIR if it exists.")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} is not a dtype", "use one of: fp32, bf16, fp16")
        if self.step is not None and self.step < 0:
            raise UsageError(f"--step {self.step} must be >= 0")


def export_hf(outdir: str | Path, opts: ExportHFOptions, *, home: Home) -> dict[str, Any]:
    """Export the chosen checkpoint to `outdir`; returns a summary (outdir, checkpoint, arch, files)."""
    import torch

    from nanoctl.checkpoint import _infer_arch, find_checkpoint, load_checkpoint, load_tokenizer_for
    from nanoctl.model.gpt import GPTConfig

    opts.validate()
    out = Path(outdir).expanduser()
    if out.exists() and not opts.force:
        raise UsageError(f"{out} already exists", "pass --force to replace it, or pick another OUTDIR")
    ref = find_checkpoint(opts.stage, opts.tag, opts.step, home=home)
    state, _, meta = load_checkpoint(ref.directory, ref.step, device=torch.device("cpu"))
    config = GPTConfig.from_dict(_infer_arch(meta["model_config"], state))
    tok = load_tokenizer_for(ref, home)
    if tok.get_vocab_size() != config.vocab_size:
        raise NanoctlError(
            f"tokenizer vocab {tok.get_vocab_size()} does not match model vocab {config.vocab_size} for {ref.label}",
            "export needs the tokenizer the model was trained with",
        )
    files = write_hf_directory(out, state, config, tok, dtype=opts.dtype)
    return {"outdir": str(out), "checkpoint": ref.to_dict(), "arch": config.arch, "files": files}


def write_hf_directory(
    out: str | Path, state: dict[str, Any], config: Any, tok: Any, *, dtype: str = "fp32"
) -> list[str]:
    """Write weights `state` (nanochat keys) of a `config` model with tokenizer `tok` as a transformers
    directory at `out` (replaced if present, atomically). Returns the file names written.

    classic -> transformers' NanoChatForCausalLM; current and deepseek -> NanoctlForCausalLM with the remote
    code copied in (trust_remote_code=True). Any other arch is refused naming it. Also used by benches and tests.
    """
    import torch
    from safetensors.torch import save_file

    from nanoctl.export import hf
    from nanoctl.tokenizer_json import write_hf_tokenizer

    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    hf.require_exportable(config)
    bos, eos = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    if config.arch == "classic":
        hf_config = hf.to_hf_config(config, bos_token_id=bos, eos_token_id=eos)
        hf_config["rms_norm_eps"] = torch.finfo(torch.float32).eps  # F.rms_norm(eps=None) in ours
        mapped = hf.to_hf_state_dict(state, config)
        code: tuple[str, ...] = ()
    else:
        hf_config = hf.to_remote_config(config, bos_token_id=bos, eos_token_id=eos)
        mapped = hf.to_remote_state_dict(state, config)
        code = hf.REMOTE_CODE_FILES
    hf_config["dtype"] = DTYPES[dtype]
    torch_dtype = getattr(torch, DTYPES[dtype])
    tensors = {}
    for k, v in mapped.items():
        saved = torch.float32 if k.endswith(hf.FP32_TENSOR_SUFFIXES) else torch_dtype
        tensors[k] = v.detach().to(saved).contiguous().clone()
    generation = {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": eos}

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staging.chmod(0o755)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        write_hf_tokenizer(tok, staging, model_max_length=config.sequence_len)
        for name in code:
            shutil.copyfile(hf.REMOTE_CODE_DIR / name, staging / name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(p.name for p in out.iterdir())
