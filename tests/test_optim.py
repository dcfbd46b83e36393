"""MuonAdamW: AdamW half vs torch, Muon geometry, convergence, 1 process == 2 processes, state round trip."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoctl.errors import NanoctlError
from nanoctl.model.gpt import GPTConfig, build_model
from nanoctl.optim import MuonAdamW, polar_express


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy shared CPU OpenMP spin-waiting makes
    # each small matmul ~50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _adamw_group(params: list[torch.nn.Parameter], **kw: Any) -> dict[str, Any]:
    return dict(kind="adamw", params=params, lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1) | kw


def _muon_group(params: list[torch.nn.Parameter], **kw: Any) -> dict[str, Any]:
    return (
        dict(kind="muon", params=params, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0) | kw
    )


# -- AdamW ------------------------------------------------------------------------------------------------------


def test_adamw_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    shapes = [(64, 32), (7,), (3, 5, 2)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = MuonAdamW([_adamw_group(ours_p)])
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for step in range(12):
        if step == 6:  # schedules change lr between steps
            for opt in (ours, ref):
                opt.param_groups[0]["lr"] = 3e-3
        for a, b in zip(ours_p, ref_p, strict=True):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state[ours_p[0]]["step"] == 12


def test_adamw_bf16_param_uses_fp32_math() -> None:
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(128, 16))
    p16 = torch.nn.Parameter(p32.detach().to(torch.bfloat16))
    ref = torch.optim.AdamW([p32], lr=1e-2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.0)
    ours = MuonAdamW([_adamw_group([p16], betas=(0.8, 0.995), weight_decay=0.0)])
    for _ in range(5):
        g = torch.randn(128, 16)
        p32.grad, p16.grad = g.clone(), g.to(torch.bfloat16)
        ref.step()
        ours.step()
    assert p16.dtype == torch.bfloat16
    assert (p16.float() - p32).abs().max().item() < 0.05  # bf16 storage, but the steps are not lost


# -- Muon -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)])
def test_first_muon_update_is_near_semi_orthogonal(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape) * 0.02)
    p0 = p.detach().clone()
    opt = MuonAdamW([_muon_group([p])])
    p.grad = torch.randn(shape)
    opt.step()
    m, n = shape
    update = (p0 - p.detach()) / (0.02 * max(1.0, m / n) ** 0.5)
    s = torch.linalg.svdvals(update)
    assert s.max() / s.min() < 4.0
    # Muon+ snaps the norm to that of a semi-orthogonal matrix; variance reduction preserves it.
    assert update.norm().item() == pytest.approx(min(m, n) ** 0.5, rel=1e-3)


def test_polar_express_approximates_polar_factor() -> None:
    torch.manual_seed(0)
    g = torch.randn(3, 48, 80)
    x = polar_express(g, 5)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
    assert cos > 0.98


def test_cautious_weight_decay_only_where_update_agrees() -> None:
    torch.manual_seed(0)
    init = torch.randn(32, 32)
    grad = torch.randn(32, 32)
    results = {}
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(init.clone())
        opt = MuonAdamW([_muon_group([p], lr=0.1, weight_decay=wd)])
        p.grad = grad.clone()
        opt.step()
        results[wd] = p.detach().clone()
    update = (init - results[0.0]) / 0.1  # p -= lr * u
    decay = results[0.0] - results[0.5]  # = lr * wd * p * mask
    mask = (update * init) >= 0
    torch.testing.assert_close(decay, 0.1 * 0.5 * init * mask, rtol=1e-4, atol=1e-6)
    assert 0 < mask.float().mean() < 1


def test_muon_group_validation() -> None:
    a, b = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([_muon_group([a, b])])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])


# -- on the model -----------------------------------------------------------------------------------------------


def tiny_config(arch: str = "current") -> GPTConfig:
    # 3 layers: with 2 the backout layer (n_layer // 2) is the last one, where backout is a no-op under
    # the final norm and its gradient is pure rounding noise.
    return GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, arch=arch)


def test_setup_optimizer_groups() -> None:
    m = build_model(
        GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=3, n_kv_head=3, n_embd=192), "cpu"
    )
    opt = m.setup_optimizer(
        unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.2, scalar_lr=0.5
    )
    by_name = {g["name"]: g for g in opt.param_groups}
    s = (192 / 768) ** -0.5
    assert by_name["lm_head"]["lr"] == pytest.approx(0.008 * s) and by_name["lm_head"]["betas"] == (0.8, 0.96)
    assert by_name["wte"]["lr"] == pytest.approx(0.3 * s) and by_name["wte"]["weight_decay"] == 0.001
    assert by_name["value_embeds"]["lr"] == pytest.approx(0.15 * s)
    assert (
        by_name["resid_lambdas"]["lr"] == pytest.approx(0.005)
        and by_name["resid_lambdas"]["weight_decay"] == 0.05
    )
    assert by_name["x0_lambdas"]["betas"] == (0.96, 0.95)
    assert by_name["smear"]["lr"] == 0.2 and len(by_name["smear"]["params"]) == 3
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert all(g["weight_decay"] == 0.2 and g["lr"] == 0.02 and g["beta2"] == 0.9 for g in muon)
    assert all(len({tuple(p.shape) for p in g["params"]}) == 1 for g in muon)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    assert all(g["eps"] == 1e-10 for g in opt.param_groups if g["kind"] == "adamw")
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(m.parameters()))


@pytest.mark.parametrize("arch", ["current", "classic"])
def test_tiny_model_loss_decreases(arch: str) -> None:
    torch.manual_seed(0)
    m = build_model(tiny_config(arch), "cpu")
    opt = m.setup_optimizer(weight_decay=0.1)
    data = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(20):
        loss = m(data[:, :-1], targets=data[:, 1:])
        loss.backward()
        opt.step()
        m.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _train(rank: int, world: int, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Same model, same global batch; each rank takes its rows (dist initialized iff world > 1)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(), "cpu")
    # Perturb nanochat's init: at init the blocks are identities (zero c_proj), so the residual scalars
    # get exactly-zero gradients whose rounding noise Adam would amplify to +-lr in either run.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # Small LRs: Muon's orthogonalization amplifies gradient differences along small singular directions,
    # so at nanochat's LRs a tiny model turns 1e-7 reduction-order noise into 1e-3 within a few steps.
    opt = model.setup_optimizer(
        unembedding_lr=0.0008, embedding_lr=0.003, matrix_lr=0.002, scalar_lr=0.005, weight_decay=0.1
    )
    for group in opt.param_groups:
        if group["kind"] == "adamw":
            # With eps=1e-10 an entry whose gradient is ~1e-10 gets an update set by rounding noise (the
            # two runs sum in different orders); a larger eps keeps this a test of the sync, not of that.
            group["eps"] = 1e-6
    gen = torch.Generator().manual_seed(1)
    per_rank = 4 // world
    for step in range(steps):
        data = torch.randint(0, 256, (4, 33), generator=gen)[rank * per_rank : (rank + 1) * per_rank]
        loss = model(data[:, :-1], targets=data[:, 1:])
        loss.backward()
        for group in opt.param_groups:  # a schedule: hyperparameters change between steps
            group["lr"] = group["initial_lr"] * (1.0 - 0.2 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.03 * step
        opt.step()
        model.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()


def _dist_worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params, optim_state = _train(rank, world, steps)
        torch.save({"params": params, "optim": optim_state}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned interpreters each import torch: ~30-90 s on a shared 2-core box
def test_one_process_equals_two_processes(tmp_path: Path) -> None:
    steps = 3
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path), steps), nprocs=2, join=True)
    single, single_optim = _train(0, 1, steps)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:  # every rank ends with the same full weights...
        for k, v in single.items():
            torch.testing.assert_close(r["params"][k], v, rtol=0, atol=2e-5, msg=k)
    # ...and moved as far as the single-process run (the test would pass trivially if nothing trained).
    start, _ = _train(0, 1, 0)
    assert (
        single["transformer.h.0.attn.c_q.weight"] - start["transformer.h.0.attn.c_q.weight"]
    ).abs().max() > 1e-3
    # ZeRO-2: each rank's state is its shard (half the rows of the big AdamW tables).
    wte_index = next(i for i, g in enumerate(single_optim["param_groups"]) if g["name"] == "wte")
    wte_param = single_optim["param_groups"][wte_index]["params"][0]
    assert single_optim["state"][wte_param]["exp_avg"].shape == (256, 64)
    for r in ranks:
        assert r["optim"]["state"][wte_param]["exp_avg"].shape == (128, 64)
    # A shard cannot be resumed by a run with another world size.
    opt = build_model(tiny_config(), "cpu").setup_optimizer()
    with pytest.raises(NanoctlError, match="world size"):
        opt.load_state_dict(ranks[1]["optim"])


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    m = build_model(tiny_config(), "cpu")
    opt = m.setup_optimizer(weight_decay=0.1)
    data = torch.randint(0, 256, (4, 33))

    def step(model: torch.nn.Module, optimizer: MuonAdamW) -> None:
        model(data[:, :-1], targets=data[:, 1:]).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step(m, opt)
    saved = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = m2.setup_optimizer(weight_decay=0.0, matrix_lr=1.0)  # hyperparameters come from the state
    opt2.load_state_dict(saved)
    assert [g["weight_decay"] for g in opt2.param_groups] == [g["weight_decay"] for g in opt.param_groups]
    step(m, opt)
    step(m2, opt2)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.gpu
def test_cuda_compiled_steps_do_not_recompile_on_hyperparameter_change() -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    m = build_model(tiny_config(), "cuda")
    opt = m.setup_optimizer(weight_decay=0.1)
    data = torch.randint(0, 256, (4, 33), device="cuda")
    for i in range(4):
        m(data[:, :-1], targets=data[:, 1:]).backward()
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * (1 - 0.1 * i)
        opt.step()
        m.zero_grad(set_to_none=True)
        if i == 1:
            compiled = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled


def test_step_kernels_compile_on_cpu_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: eager step kernels off CUDA; NANOCTL_OPTIM_COMPILE=all compiles them there too, 0 never."""
    from nanoctl import optim

    cpu = torch.device("cpu")
    monkeypatch.delenv(optim.COMPILE_ENV, raising=False)
    assert optim._kernel("adamw", cpu) is optim.adamw_step
    monkeypatch.setenv(optim.COMPILE_ENV, "all")
    compiled = optim._kernel("muon", cpu)
    assert compiled is not optim.muon_step and optim._kernel("muon", cpu) is compiled  # built once, reused
    monkeypatch.setenv(optim.COMPILE_ENV, "0")
    assert optim._kernel("muon", cpu) is optim.muon_step
