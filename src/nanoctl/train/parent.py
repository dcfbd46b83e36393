"""Post-training starts from a parent checkpoint: the options that choose it, its lookup, and the
`PostStage` base that loads it (mid, sft and rl).

The stage chain is base -> mid -> sft -> rl. Each stage starts from its parent's latest checkpoint (sft
falls back to base when there is no mid), writes `<home>/checkpoints/<stage>/<tag>/` with the parent in
the meta (`parent`: {stage, tag, step}) and logs `<home>/reports/<tag>/<stage>/metrics.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError, UsageError
from nanoctl.options import DATA, OPTIMIZATION, OUTPUT, START, option
from nanoctl.tasks.identity import DEFAULT_CREATOR, DEFAULT_NAME
from nanoctl.train.stage import Plan, Run, Stage, StageOptions

# Where each stage starts from, in order of preference, and what to run when there is none.
PARENTS: dict[str, tuple[str, ...]] = {"mid": ("base",), "sft": ("mid", "base"), "rl": ("sft",)}
MISSING_PARENT_HINT = {
    "mid": "`nanoctl pretrain`",
    "sft": "`nanoctl pretrain` (and `nanoctl mid`)",
    "rl": "`nanoctl sft`",
}


@dataclass
class PostOptions(StageOptions):
    """Options every post-training stage has (see each stage's Options for the rest)."""

    source: str | None = option(
        None, help="Parent stage: base, mid, sft (unset: the stage's natural parent).", panel=START
    )
    model_tag: str | None = option(None, help="Parent checkpoint tag (unset: the largest d<N>).", panel=START)
    model_step: int | None = option(None, help="Parent checkpoint step (unset: its latest).", panel=START)
    checkpoint: str | None = option(None, help="Start from this checkpoint directory instead.", panel=START)
    output_tag: str | None = option(
        None, help="Tag of the checkpoints written (unset: the parent's tag).", panel=OUTPUT
    )
    data_dir: str | None = option(
        None, help="Directory holding task datasets in their original formats (gsm8k/train.jsonl, mmlu/test/*.csv, ...).",
        panel=DATA,
    )
    embedding_lr: float = option(0.2, help="AdamW LR of the token embedding.", panel=OPTIMIZATION)
    unembedding_lr: float = option(0.004, help="AdamW LR of the output head.", panel=OPTIMIZATION)
    matrix_lr: float = option(0.02, help="Muon LR of the transformer matrices.", panel=OPTIMIZATION)
    scalar_lr: float = option(0.5, help="AdamW LR of the residual scalars.", panel=OPTIMIZATION)
    weight_decay: float = option(0.0, help="Muon weight decay.", panel=OPTIMIZATION)
    lora_rank: int = option(
        0, help="Train rank-R LoRA adapters instead of every weight (base frozen; 0 = full fine-tuning)."
        " Written to <home>/adapters/<stage>/<tag>/ in PEFT's format.", panel=OPTIMIZATION,
    )
    lora_alpha: float | None = option(
        None, help="LoRA scale numerator: updates are alpha/rank x B A (unset: 2 x rank).", panel=OPTIMIZATION
    )
    lora_dropout: float = option(0.0, help="Dropout on the adapters' input while training.", panel=OPTIMIZATION)
    lora_targets: str = option(
        "all", help="Block matrices that get adapters, comma-separated: q, k, v, proj (attention output),"
        " fc (MLP up), mlp_proj (MLP down); arch deepseek: q, kv_down, kv_up (MLA's KV down/up projections),"
        " proj, fc, mlp_proj (dense and shared-expert MLPs; routed experts and router stay frozen);"
        " all = every one the arch has.", panel=OPTIMIZATION,
    )
    lora_lr: float | None = option(
        None, help="AdamW LR of the adapters (unset: 1e-3 on CUDA, 1e-2 on CPU for short tiny runs; the"
        " stage's LR schedule applies; --*-lr and --init-lr-frac are unused with --lora-rank).",
        panel=OPTIMIZATION,
    )


@dataclass
class MixtureOptions(PostOptions):
    """Options of the stages that train on a conversation mixture (mid, sft)."""

    data: list[str] = option(
        help='Conversations JSONL (one {"messages": [...]} or message list per line); repeatable.'
        " Replaces the mixture unless --mix.", panel=DATA, factory=list,
    )
    mix: bool = option(False, help="Add --data to the stage's task mixture instead of replacing it.", panel=DATA)
    val_holdout: int | None = option(
        None, help="Hold out this many training conversations as validation when the mixture has no val split.",
        panel=DATA,
    )
    identity_name: str = option(
        DEFAULT_NAME, help="The model's name: the identity conversations teach it that it is NAME.", panel=DATA
    )
    identity_creator: str = option(
        DEFAULT_CREATOR, help="Who made it, in the identity conversations.", panel=DATA
    )
    train_task: Any = option(None, help="A Task to train on instead of the mixture.", cli=False)
    val_task: Any = option(None, help="A Task to validate on.", cli=False)


def resolve_parent(stage: str, opts: PostOptions, home: Any) -> Any:
    """The checkpoint this stage starts from; an error naming the command to run when there is none."""
    from nanoctl.checkpoint import STAGE_COMMANDS, find_checkpoint, resolve_checkpoint_path

    if opts.checkpoint:
        return resolve_checkpoint_path(opts.checkpoint, opts.model_step)
    if opts.source:
        if opts.source not in STAGE_COMMANDS:
            raise UsageError(f"--source {opts.source!r} is not one of base, mid, sft, rl")
        return find_checkpoint(opts.source, opts.model_tag, opts.model_step, home=home)
    for parent in PARENTS[stage]:
        try:
            return find_checkpoint(parent, opts.model_tag, opts.model_step, home=home)
        except NanoctlError:
            continue
    tag = f" with tag {opts.model_tag!r}" if opts.model_tag else ""
    raise NanoctlError(
        f"no {' or '.join(PARENTS[stage])} checkpoint{tag} to start {stage} from",
        f"run {MISSING_PARENT_HINT[stage]} first (or pass --checkpoint DIR)",
    )


def read_parent_meta(ref: Any) -> dict[str, Any]:
    import json

    from nanoctl.checkpoint import meta_path

    return json.loads(meta_path(ref.directory, ref.step).read_text())


def lineage(ref: Any) -> dict[str, Any]:
    return {"stage": ref.stage, "tag": ref.tag, "step": ref.step}


class PostStage(Stage):
    """A stage that continues a parent checkpoint (mid, sft, rl)."""

    @classmethod
    def prepare_home(cls, home: Any) -> None:
        # The packaged identity conversations and word list make mid/sft/rl work offline on a fresh home.
        from nanoctl.tasks.starter import install_starter_task_data

        install_starter_task_data(home)

    def find_parent(self) -> tuple[Any, dict[str, Any], str]:
        """(parent ref, its meta, the output tag)."""
        self.ref = resolve_parent(self.name, self.opts, self.home)
        return self.ref, read_parent_meta(self.ref), self.opts.output_tag or self.ref.tag

    def context_len(self, parent_meta: dict[str, Any]) -> int:
        """--max-seq-len, checked against the parent's context (default: the whole context)."""
        ctx = int(parent_meta["model_config"]["sequence_len"])
        T = getattr(self.opts, "max_seq_len", None) or ctx
        if T > ctx:
            raise UsageError(f"--max-seq-len {T} is longer than the model's context ({ctx})",
                             f"use --max-seq-len {ctx} or less")
        return T

    def persona(self) -> Any:
        """Who the identity conversations say the model is (--identity-name, --identity-creator)."""
        from nanoctl.tasks.identity import Persona

        return Persona(self.o.identity_name, self.o.identity_creator)

    def persona_keys(self) -> dict[str, Any]:
        """Resume keys for a renamed model (none for nanochat's own, so older runs still resume)."""
        p = self.persona()
        return {} if p.is_default else {"--identity-name": p.name, "--identity-creator": p.creator}

    def persona_lines(self, mixture: Any) -> list[str]:
        p = self.persona()
        if p.is_default:
            return []
        if any(s.name == "identity" and s.ok for s in mixture.train_sources):
            return [f"identity: the model is {p.name}, made by {p.creator} (the identity conversations say so)"]
        return [f"note: --identity-name/--identity-creator rename the model in the identity conversations,"
                f" which this {self.name} mixture does not hold" + (" (add --mix)" if self.o.data else "")]

    def mixture_of_options(self) -> Any:
        """The conversation mixture of mid/sft: library-given Tasks, else the stage's mixture + --data."""
        from nanoctl.tasks.mixtures import Mixture, build_mixture

        o = self.o
        if o.train_task is not None:
            val = o.val_task if o.val_task is not None else o.train_task
            return Mixture(o.train_task, val, val_note="library-provided tasks")
        return build_mixture(self.name, data_dir=o.data_dir, home=self.home, data=o.data, mix=o.mix,
                             val_holdout=o.val_holdout, persona=self.persona())

    def load_model(self, run: Run) -> tuple[Any, Any]:
        from nanoctl.checkpoint import load_model

        model, tokenizer, _ = load_model(self.ref, device=run.device, dtype=run.dtype, home=self.home, phase="train")
        if self.opts.lora_rank:
            from nanoctl.model.lora import add_lora

            add_lora(model, self.lora_config)
        return model, tokenizer

    # --- LoRA (--lora-rank): adapters train, the rest is frozen; the framework's checkpoints hold the
    # adapters and their AdamW state, in the adapter directory, so resume works as for a full run.

    def make_plan(self) -> Plan:
        o = self.opts
        if not o.lora_rank:
            return self.plan()
        from nanoctl.model.lora import make_config

        # checked first: a bad flag is a usage error whatever the home holds
        make_config(o.lora_rank, o.lora_alpha, o.lora_dropout, o.lora_targets)
        # CPU: 30 steps of a tiny model barely move at 1e-3 (bench/RESULTS.md, LoRA); CUDA: LoRA's usual LR
        lr = self.lora_lr = o.lora_lr if o.lora_lr is not None else (1e-3 if self.device.type == "cuda" else 1e-2)
        if lr <= 0:
            raise UsageError(f"--lora-lr {lr} must be > 0")
        plan = self.plan()
        # the targets (and `all`) are the base's arch's: checked again now that the parent is known
        arch = read_parent_meta(self.ref)["model_config"].get("arch", "current")
        cfg = self.lora_config = make_config(o.lora_rank, o.lora_alpha, o.lora_dropout, o.lora_targets, arch)
        # the stage's first line names where it writes: the adapter directory, not checkpoints/
        plan.lines[0] = plan.lines[0].replace(f"-> checkpoints/{self.name}/", f"-> adapters/{self.name}/", 1)
        plan.lines.append(
            f"lora: rank {cfg.rank}, alpha {cfg.alpha:g} (scale {cfg.scaling:g}), dropout {cfg.dropout:g},"
            f" targets {','.join(cfg.targets)}; base weights frozen; AdamW LR {lr:g} on the adapters"
        )
        plan.resume_keys["lora"] = cfg.to_dict() | {"lr": lr}
        plan.meta["lora"] = cfg.to_dict()
        return plan

    def run_dir(self, tag: str) -> Path:
        return self.home.adapter_dir(self.name, tag) if self.opts.lora_rank else super().run_dir(tag)

    def report_dir(self, tag: str) -> Path:
        # reports/<tag>/sft-lora/: a full run of the same tag keeps its own metrics.jsonl
        return self.home.report_dir(tag) / f"{self.name}-lora" if self.opts.lora_rank else super().report_dir(tag)

    def build_optimizer(self, model: Any) -> Any:
        if not self.opts.lora_rank:
            return super().build_optimizer(model)
        from nanoctl.model.lora import lora_parameters
        from nanoctl.optim import MuonAdamW

        # AdamW, not Muon: A and B are thin factors whose product is the update; LoRA's LRs and
        # practice (and PEFT's) are AdamW's, and Muon's orthogonalized steps on a factor pair are untested.
        lr = self.lora_lr
        optimizer = MuonAdamW([dict(kind="adamw", name="lora", params=lora_parameters(model), lr=lr,
                                    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, initial_lr=lr)])
        return optimizer

    def model_state(self, model: Any) -> dict[str, Any] | None:
        if not self.opts.lora_rank:
            return None
        from nanoctl.model.lora import adapter_state_dict

        return adapter_state_dict(model)

    def load_model_state(self, model: Any, state: dict[str, Any]) -> None:
        if not self.opts.lora_rank:
            return super().load_model_state(model, state)
        from nanoctl.model.lora import load_adapter_state

        load_adapter_state(model, state)

    def after_save(self, run: Run) -> None:
        if self.opts.lora_rank and run.master:
            from nanoctl.model.lora import save_adapter

            # PEFT's files track the newest checkpoint, so the directory is usable (--lora) at any time.
            save_adapter(run.directory, run.model, {"stage": self.name, "tag": run.plan.tag, "step": run.step,
                                                    "parent": run.plan.parent})

    def result(self, run: Run) -> dict[str, Any]:
        state = self.state()
        return {"val_loss": state.get("val_loss"), "metrics": state.get("metrics", {}), "data": state.get("data", {})}
