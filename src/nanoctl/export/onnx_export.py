"""`nanoctl export onnx`, library side: a checkpoint as one ONNX decoder graph with explicit KV cache.

The graph (see export/onnx_graph.py for its inputs and outputs) is traced with torch.onnx's dynamo
exporter (torch.export + onnxscript): it keeps the batch, sequence and past lengths symbolic from named
`Dim`s, so one graph does prefill and decode. It is checked against our model with onnxruntime before
anything is written. `--int8` then runs onnxruntime's dynamic quantization on the weight MatMuls (int8
weights per output channel, activations quantized on the fly). tokenizer.json goes next to the .onnx so
a runner needs only onnxruntime, tokenizers and numpy (docs/onnx_generate.py). No torch at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.options import START, option

ARCHS = ("current", "classic")  # the architectures OnnxDecoder implements
DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter's floor
MAX_OPSET = 25  # the newest that exported and ran in onnxruntime 1.32 (23+ use its RMSNormalization op)
VERIFY_TOLERANCE = 1e-3  # max |logit difference| of the fp32 graph vs our model on the check prompt
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB: bigger weights go to OUT.onnx.data
INSTALL_HINT = 'pip install "nanoctl[export]"  (pipx: pipx inject nanoctl onnx onnxruntime onnxscript)'


@dataclass
class ExportOnnxOptions:
    """Everything `nanoctl export onnx` takes besides OUT; the CLI flags are derived from these fields."""

    stage: str | None = option(
        None, help="base|mid|sft|rl (default: newest of rl > sft > mid > base).", panel=START
    )
    tag: str | None = option(None, help="Model tag, e.g. d20 (default: largest d<N>).", panel=START)
    step: int | None = option(None, help="Checkpoint step (default: latest).", panel=START)
    int8: bool = option(False, help="Quantize the weight matmuls to int8 (onnxruntime dynamic quantization).")
    opset: int = option(DEFAULT_OPSET, help=f"ONNX opset version ({MIN_OPSET} to {MAX_OPSET}).")
    force: bool = option(False, help="Replace OUT if it exists.")

    def validate(self) -> None:
        if self.step is not None and self.step < 0:
            raise UsageError(f"--step {self.step} must be >= 0")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise UsageError(
                f"--opset {self.opset} is out of range",
                f"use {MIN_OPSET} (the default, for older runtimes) to {MAX_OPSET}",
            )


def require_onnx() -> None:
    """One line naming what to install when the export extra is missing."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError as e:
            raise NanoctlError(
                f"export onnx needs the {name} package, which is not installed", INSTALL_HINT
            ) from e


def require_supported(arch: str) -> None:
    if arch not in ARCHS:
        raise UsageError(f"export onnx does not know model arch {arch!r}", f"it exports: {', '.join(ARCHS)}")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress lines and warnings (torchvision missing, deprecations): keep them out
    of our output; its errors still propagate."""
    # quantize_dynamic warns on the root logger
    loggers = [logging.getLogger("torch.onnx"), logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as devnull,
            contextlib.redirect_stdout(devnull),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trace_decoder(model: Any, path: Path, opset: int, metadata: dict[str, str] | None = None) -> None:
    """Export `model` (a GPT, fp32, CPU) as the KV-cache decoder graph at `path`."""
    import torch
    from torch.export import Dim

    from nanoctl.export.onnx_graph import (
        BATCH,
        PAST,
        SEQ,
        OnnxDecoder,
        empty_state,
        output_names,
        state_names,
    )

    decoder = OnnxDecoder(model).eval()
    names = state_names(model)
    batch, past, seq = Dim(BATCH), Dim(PAST), Dim(SEQ)
    # Example sizes above 1: torch.export specializes dimensions it sees as 0 or 1.
    example = (torch.zeros(2, 3, dtype=torch.long), *empty_state(model, batch=2, past=2))
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "state": tuple({0: batch} if n == "past_smear" else {0: batch, 2: past} for n in names),
    }
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            decoder,
            example,
            dynamo=True,
            input_names=["input_ids", *names],
            output_names=output_names(model),
            dynamic_shapes=shapes,
            opset_version=opset,
            optimize=True,
        )
        assert program is not None
        program.model.metadata_props.update(metadata or {})
        program.save(str(path), external_data=params > EXTERNAL_DATA_BYTES)


def verify_graph(model: Any, path: Path, tokens: list[int]) -> float:
    """Max |logit difference| between onnxruntime on `path` and our model: a prefill then two decode steps."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from nanoctl.export.onnx_graph import empty_state, state_names

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).numpy()
    names = state_names(model)
    state = {n: t.numpy() for n, t in zip(names, empty_state(model), strict=True)}
    prefill = len(tokens) - 2
    got = []
    for chunk in (tokens[:prefill], tokens[prefill : prefill + 1], tokens[prefill + 1 :]):
        logits, *present = session.run(None, {"input_ids": np.array([chunk], dtype=np.int64), **state})
        state = dict(zip(names, present, strict=True))
        got.append(logits)
    return float(np.abs(np.concatenate(got, axis=1) - expected).max())


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=source.with_name(source.name + ".data").exists(),
        )


def export_onnx(out: str | Path, opts: ExportOnnxOptions, *, home: Home) -> dict[str, Any]:
    """Export the chosen checkpoint to `out` (+ tokenizer.json beside it); returns a summary."""
    opts.validate()
    out = Path(out).expanduser()
    if out.exists() and not opts.force:
        raise UsageError(f"{out} already exists", "pass --force to replace it, or pick another OUT")
    if out.is_dir():
        raise UsageError(f"{out} is a directory", "OUT names the .onnx file to write, e.g. model.onnx")
    require_onnx()
    import torch

    from nanoctl.atomic import atomic_write_text
    from nanoctl.checkpoint import find_checkpoint, load_meta, load_model
    from nanoctl.tokenizer_json import HF_TOKENIZER_NAME, tokenizer_json

    ref = find_checkpoint(opts.stage, opts.tag, opts.step, home=home)
    require_supported(str(load_meta(ref.directory, ref.step).get("model_config", {}).get("arch", "current")))
    model, tok, _ = load_model(ref, device="cpu", dtype=torch.float32, home=home)
    bos = tok.get_bos_token_id()
    stops = [tok.encode_special("<|assistant_end|>"), bos]
    metadata = {
        "nanoctl.checkpoint": ref.label,
        "nanoctl.arch": model.config.arch,
        "bos_token_id": str(bos),
        "stop_token_ids": ",".join(map(str, stops)),
        "context_length": str(model.config.sequence_len),
    }
    probe = [bos, *tok.encode("The capital of France is")][:8]
    probe += [bos] * (4 - len(probe))  # at least a 2-token prefill and two decode steps

    out.parent.mkdir(parents=True, exist_ok=True)
    # The staged files carry their final names: an external-data .onnx refers to its .data file by name.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fp32 = staging / ("fp32" if opts.int8 else "") / out.name
        fp32.parent.mkdir(exist_ok=True)
        trace_decoder(model, fp32, opts.opset, metadata)
        diff = verify_graph(model, fp32, probe)
        if not diff <= VERIFY_TOLERANCE:
            raise NanoctlError(
                f"the exported graph's logits differ from the model's by {diff:.2e} (> {VERIFY_TOLERANCE})",
                "this is a bug in nanoctl's ONNX export; please report it with the checkpoint's config",
            )
        final = fp32
        if opts.int8:
            final = staging / out.name
            quantize_int8(fp32, final)
        data = final.with_name(final.name + ".data")
        stale = out.with_name(out.name + ".data")
        if data.exists():
            os.replace(data, stale)
        elif stale.exists():
            stale.unlink()
        os.replace(final, out)  # last: the .onnx appears only once its weights are in place
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(out.parent / HF_TOKENIZER_NAME, tokenizer_json(tok))
    files = [out.name, HF_TOKENIZER_NAME] + ([stale.name] if stale.exists() else [])
    return {
        "out": str(out),
        "checkpoint": ref.to_dict(),
        "arch": model.config.arch,
        "int8": opts.int8,
        "opset": opts.opset,
        "exporter": "torch.onnx dynamo",
        "verify_max_abs_diff": diff,
        "bytes": sum((out.parent / f).stat().st_size for f in files),
        "files": files,
    }
