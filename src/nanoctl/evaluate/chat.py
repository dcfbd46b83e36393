"""`nanoctl eval chat`: nanochat's chat_eval (reference §1.9, §7 "Chat evals").

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU): `categorical_accuracy`, also SFT's in-training
metric: batches of prompts padded with BOS, one forward each; the logits at each prompt's last position,
restricted to the answer letters, are argmaxed. Only those last positions go through the head; a prompt
longer than the context keeps its end. Generative tasks (GSM8K, HumanEval, SpellingBee): Engine sampling,
`num_samples` per problem; a problem counts as solved if any sample passes (pass@k, k = num_samples);
pass@j for j = 1..k is recorded too. ChatCORE = mean over the tasks run of (acc - b) / (1 - b), with b
the task's random baseline (0.25 for 4-way MC, 0 for generative).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nanoctl.engine import SamplingParams
from nanoctl.errors import NanoctlError, UsageError
from nanoctl.home import Home
from nanoctl.inference_options import check_quantize, prepare_for_inference, quantize_option, record_name

ProgressFn = Callable[[int, int, float], None]  # (problems done, total, running accuracy)
CHAT_STAGES = ("rl", "sft", "mid")  # default: the newest of these


@dataclass
class ChatEvalOptions:
    tasks: Sequence[str] | None = None  # default: tasks.CHAT_EVAL_TASKS
    stage: str | None = None  # default: newest of rl > sft > mid
    tag: str | None = None
    step: int | None = None
    checkpoint: str | None = None
    lora: str | None = None  # a LoRA adapter directory mounted on the model (default base: its own)
    max_problems: int | None = None
    num_samples: int = 1
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_k: int = 50
    batch_size: int = 8
    data_dir: str | None = None
    device: str = "auto"
    dtype: str | None = None
    write: bool = True
    progress: bool = True
    # Run HumanEval completions with the Python guard alone where the kernel sandbox is unavailable.
    unsafe_exec: bool = False
    quantize: str = quantize_option()  # int8: records as <stage>-int8 beside the fp32 results


@dataclass
class ChatTaskResult:
    name: str
    eval_type: str
    problems: int
    correct: int
    accuracy: float
    baseline: float
    centered: float
    seconds: float
    pass_at_k: list[float] | None = None  # generative: pass@1..num_samples


@dataclass
class ChatEvalResult:
    stage: str
    tag: str
    step: int
    tasks: list[ChatTaskResult] = field(default_factory=list)
    chatcore: float | None = None
    chatcore_cat: float | None = None
    complete: bool = False  # all of nanochat's six tasks ran (ChatCORE comparable with nanochat's)
    seconds: float = 0.0
    json_path: str | None = None
    markdown_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def centered(accuracy: float, baseline: float) -> float:
    """(acc - b) / (1 - b), with b the random-guess accuracy as a fraction."""
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(results: Sequence[ChatTaskResult], categorical_only: bool = False) -> float | None:
    rows = [r for r in results if r.eval_type == "categorical" or not categorical_only]
    return sum(r.centered for r in rows) / len(rows) if rows else None


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_across_ranks(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[int]:
    """The token id of each answer letter ("A" with no leading space, as the prompts end).

    nanoctl's tokenizers are byte-level, so a single ASCII letter is always one token; a tokenizer where
    one is not cannot be scored this way, and that is a NanoctlError rather than a silent first token.
    """
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise NanoctlError(
                f"answer letter {letter!r} encodes to {len(enc)} tokens {enc} with this tokenizer; "
                "categorical scoring needs each letter to be a single token",
                "use a tokenizer trained by `nanoctl tok train` (byte-level: every ASCII letter is one token)",
            )
        ids.append(enc[0])
    return ids


def categorical_accuracy(
    model: Any,
    tokenizer: Any,
    task: Any,
    *,
    max_problems: int | None,
    batch_size: int,
    device: Any,
    rank: int = 0,
    world_size: int = 1,
    progress: ProgressFn | None = None,
) -> float:
    """Accuracy on a multiple-choice task (nanochat's categorical eval); NaN when there is no problem.

    The first `max_problems` problems (None or <= 0: all) in batches of `batch_size`; batch b goes to
    rank b % world_size, and when torch.distributed is initialized the correct/total counts are summed
    across ranks. Each prompt is `render_for_completion` (a prompt longer than the model's context keeps
    its end), the batch is right-padded with BOS, one forward scores only the last prompt position of
    each row, and the logits of the answer letters are argmaxed. The model is put in eval mode for the
    call (a torch.compile wrapper is looked through) and its train/eval mode restored afterwards.
    `progress(done, total, accuracy)` is called after each batch (done counts all ranks' estimate).
    """
    import torch
    import torch.distributed as dist

    from nanoctl.evaluate.core import _scored_logits

    if batch_size < 1:
        raise UsageError(f"batch size {batch_size} must be >= 1")
    m = getattr(model, "_orig_mod", model)
    ctx = int(m.config.sequence_len)
    bos = tokenizer.get_bos_token_id()
    n = min(len(task), max_problems) if max_problems is not None and max_problems > 0 else len(task)
    letter_ids: dict[tuple[str, ...], list[int]] = {}
    correct = total = 0
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad():
            for b0 in range(rank * batch_size, n, batch_size * world_size):
                convs = [task[i] for i in range(b0, min(b0 + batch_size, n))]
                prompts = [tokenizer.render_for_completion(c)[-ctx:] for c in convs]
                width = max(len(p) for p in prompts)
                ids = torch.tensor(
                    [p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device
                )
                rows = torch.arange(len(prompts), device=device)
                cols = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
                logits = _scored_logits(m, ids, rows, cols)  # (B, V): only the answer positions
                for i, conv in enumerate(convs):
                    letters = tuple(conv["letters"])
                    if letters not in letter_ids:
                        letter_ids[letters] = letter_token_ids(tokenizer, letters)
                    focus = logits[i, letter_ids[letters]]
                    predicted = letters[int(focus.argmax().item())]
                    correct += bool(task.evaluate(conv, predicted))
                    total += 1
                if progress:
                    progress(total * world_size, n, correct / total)
    finally:
        m.train(was_training)
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = int(counts[0].item()), int(counts[1].item())
    return correct / total if total else float("nan")


def run_generative(
    model: Any,
    tokenizer: Any,
    task: Any,
    params: SamplingParams,
    num_samples: int = 1,
    max_problems: int | None = None,
    progress: ProgressFn | None = None,
    engine: Any = None,
) -> tuple[int, int, list[float]]:
    """(solved, total, pass@1..k) for a generative task; problems strided across ranks.

    `params` is how to sample (greedy: `SamplingParams(temperature=0.0)`), its max_tokens the budget per
    answer; row j of problem i samples with seed `params.seed + j`."""
    from nanoctl.engine import Engine

    engine = engine or Engine(model, tokenizer)
    device = model.get_device()
    n = min(len(task), max_problems) if max_problems else len(task)
    rank, world = _world()
    solved = total = 0
    pass_counts = [0.0] * num_samples
    for i in range(rank, n, world):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        rows, _ = engine.generate_batch(prompt, params, num_samples=num_samples)
        outcomes = [bool(task.evaluate(conv, tokenizer.decode(r[len(prompt) :]))) for r in rows]
        for j in range(num_samples):
            pass_counts[j] += float(any(outcomes[: j + 1]))
        solved += any(outcomes)
        total += 1
        if progress:
            progress(total * world, n, solved / total)
    summed = _sum_across_ranks([float(solved), float(total), *pass_counts], device)
    solved, total = int(summed[0]), int(summed[1])
    return solved, total, [p / total if total else float("nan") for p in summed[2:]]


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _sandbox_gate(names: list[str], *, explicit: bool, unsafe_exec: bool) -> list[str]:
    """Code-running tasks need the kernel sandbox. Asked for by name, its absence stops the run (unless
    --unsafe-exec); in the default set, the task is left out with a warning so the rest still runs."""
    code_tasks = [n for n in names if n.lower() == "humaneval"]
    if not code_tasks:
        return names
    from nanoctl.tools import sandbox

    lay = sandbox.layers()
    if lay.isolated:
        return names
    if unsafe_exec:
        warn("--unsafe-exec: HumanEval completions run with the Python guard alone (no kernel sandbox: "
             f"{'; '.join(lay.missing)}). Model-written code can reach this machine.")
        return names
    if explicit:
        raise NanoctlError(
            f"HumanEval runs model-written code and the sandbox is unavailable here: {'; '.join(lay.missing)}",
            "install the missing layer, or pass --unsafe-exec to run it with the Python guard alone",
        )
    warn(f"skipping HumanEval: no kernel sandbox here ({'; '.join(lay.missing)}); "
         "pass -t HumanEval --unsafe-exec to run it with the Python guard alone")
    return [n for n in names if n not in code_tasks]


def build_tasks(
    names: Sequence[str], data_dir: str | None, home: Home, *, unsafe_exec: bool = False
) -> list[tuple[str, Any, Any]]:
    """(canonical name, task, TaskInfo) per requested name; unknown names list the valid ones."""
    from nanoctl.tasks import TASK_INFO, TASKS, get_task

    scored = [n for n in TASKS if n not in ("SmolTalk", "identity")]
    lookup = {n.lower(): n for n in scored}
    out = []
    for name in names:
        key = lookup.get(name.lower())
        if key is None:
            raise UsageError(f"unknown chat eval task {name!r}", f"valid tasks: {', '.join(scored)}")
        kwargs: dict[str, Any] = {"home": home}
        if data_dir:
            kwargs["data_dir"] = data_dir
        if key == "HumanEval":
            kwargs["unsafe_exec"] = unsafe_exec
        out.append((key, get_task(key, **kwargs), TASK_INFO[key]))
    return out


def resolve_chat_checkpoint(opts: ChatEvalOptions, home: Home) -> Any:
    from nanoctl.checkpoint import find_checkpoint, resolve_checkpoint_path

    if opts.lora is not None:
        from nanoctl.adapters import check_adapter_path, resolve_base

        check_adapter_path(opts.lora)
        if not (opts.checkpoint or opts.stage or opts.tag or opts.step is not None):
            return resolve_base(opts.lora, None, None, None, None, home)
    if opts.checkpoint:
        return resolve_checkpoint_path(opts.checkpoint, opts.step)
    if opts.stage:
        return find_checkpoint(opts.stage, opts.tag, opts.step, home=home)
    for stage in CHAT_STAGES:
        try:
            return find_checkpoint(stage, opts.tag, opts.step, home=home)
        except NanoctlError:
            continue
    raise NanoctlError(
        "no chat checkpoint (rl, sft or mid) to evaluate",
        "train one with `nanoctl sft` (or evaluate a base model with `--stage base`)",
    )


def _validate(opts: ChatEvalOptions) -> None:
    if opts.num_samples < 1:
        raise UsageError(f"-n/--num-samples {opts.num_samples} must be >= 1")
    if opts.batch_size < 1:
        raise UsageError(f"--batch-size {opts.batch_size} must be >= 1")
    if opts.max_problems is not None and opts.max_problems < 1:
        raise UsageError(f"--max-problems {opts.max_problems} must be >= 1")
    check_quantize(opts.quantize, opts.device, opts.dtype)
    if opts.temperature < 0:
        raise UsageError(f"--temperature {opts.temperature} must be >= 0", "0 means greedy")
    if opts.top_k < 0:
        raise UsageError(f"--top-k {opts.top_k} must be >= 0", "0 means no top-k filtering")
    if opts.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {opts.max_new_tokens} must be >= 1")


def run_chat_eval(
    opts: ChatEvalOptions, *, home: Home | str | os.PathLike[str] | None = None
) -> ChatEvalResult:
    """Evaluate a chat checkpoint on the tasks; writes `<home>/reports/<tag>/eval_chat_<stage>_<step>.*`.

    An entry point: `home` is resolved here.
    """
    _validate(opts)
    from nanoctl.tasks import CHAT_EVAL_TASKS

    home = Home.resolve(home)
    names = list(opts.tasks) if opts.tasks else list(CHAT_EVAL_TASKS)
    names = _sandbox_gate(names, explicit=bool(opts.tasks), unsafe_exec=opts.unsafe_exec)
    tasks = build_tasks(names, opts.data_dir, home, unsafe_exec=opts.unsafe_exec)  # bad names/data fail fast
    ref = resolve_chat_checkpoint(opts, home)

    from nanoctl import dist
    from nanoctl.checkpoint import load_model
    from nanoctl.device import compute_dtype, parse_dtype
    from nanoctl.engine import Engine
    from nanoctl.evaluate.progress import EvalProgress
    from nanoctl.evaluate.results import EvalRecord, hardware_info, model_summary, write_record

    t0 = time.perf_counter()
    info = dist.init_distributed(opts.device)
    dtype = parse_dtype(opts.dtype) if opts.dtype else compute_dtype(info.device)
    check_quantize(opts.quantize, info.device, dtype)
    model, tokenizer, meta = load_model(ref, device=info.device, dtype=dtype, home=home)
    lora = prepare_for_inference(model, opts.lora, opts.quantize)
    if lora is not None:
        meta["lora"] = lora
    stage, step = record_name(ref.stage, ref.step, lora, opts.quantize)  # eval_chat_sft-lora_*, ...-int8_*
    model.eval()
    engine = Engine(model, tokenizer)
    sampling = SamplingParams(
        temperature=opts.temperature, top_k=opts.top_k or None, max_tokens=opts.max_new_tokens
    )
    result = ChatEvalResult(stage=stage, tag=ref.tag, step=step)
    bar = EvalProgress(enabled=opts.progress and info.is_master)
    try:
        for name, task, tinfo in tasks:
            n = min(len(task), opts.max_problems) if opts.max_problems else len(task)
            bar.start(name, n)

            def tick(done: int, total: int, acc: float) -> None:
                bar.update(min(done, total), f"acc {acc:.2%}")

            ts = time.perf_counter()
            pass_at_k = None
            if tinfo.eval_type == "categorical":
                accuracy = categorical_accuracy(
                    model,
                    tokenizer,
                    task,
                    max_problems=opts.max_problems,
                    batch_size=opts.batch_size,
                    device=info.device,
                    rank=info.rank,
                    world_size=info.world_size,
                    progress=tick,
                )
                # Every one of the first n problems is scored once (across the ranks): total is n.
                total = n
                correct = 0 if math.isnan(accuracy) else round(accuracy * n)
            else:
                correct, total, pass_at_k = run_generative(
                    model, tokenizer, task, sampling, opts.num_samples, opts.max_problems, tick, engine
                )
            acc = correct / total if total else 0.0
            r = ChatTaskResult(
                name=name,
                eval_type=tinfo.eval_type,
                problems=total,
                correct=correct,
                accuracy=acc,
                baseline=tinfo.baseline,
                centered=centered(acc, tinfo.baseline),
                seconds=time.perf_counter() - ts,
                pass_at_k=pass_at_k,
            )
            result.tasks.append(r)
            bar.finish(
                f"{name:<14} {correct}/{total} = {acc:.2%} | centered {r.centered:+.4f} | {r.seconds:.1f}s"
            )
    finally:
        bar.close()
    result.chatcore = chatcore(result.tasks)
    result.chatcore_cat = chatcore(result.tasks, categorical_only=True)
    result.complete = set(CHAT_EVAL_TASKS) <= {r.name for r in result.tasks}
    result.seconds = time.perf_counter() - t0
    record = EvalRecord(
        kind="chat",
        stage=stage,
        tag=ref.tag,
        step=step,
        model=model_summary(meta) | ({"lora": meta["lora"]} if "lora" in meta else {}),
        settings={
            "tasks": [n for n, _, _ in tasks],
            "max_problems": opts.max_problems,
            "num_samples": opts.num_samples,
            "max_new_tokens": opts.max_new_tokens,
            "temperature": opts.temperature,
            "top_k": opts.top_k,
            "batch_size": opts.batch_size,
            "dtype": str(dtype).removeprefix("torch."),
            "quantize": opts.quantize,
            "world_size": info.world_size,
        },
        results={
            "tasks": [asdict(t) for t in result.tasks],
            "chatcore": result.chatcore,
            "chatcore_cat": result.chatcore_cat,
            "complete": result.complete,
        },
        seconds=result.seconds,
        hardware=hardware_info(info.device),
    )
    if opts.write and info.is_master:
        j, m = write_record(record, home)
        result.json_path, result.markdown_path = str(j), str(m)
    return result
