"""Worker scenarios for the multi-process tests; run as ``workers.py SCENARIO ARGS`` on each rank.

Every rank builds the same tiny model and data from fixed seeds, so each rank can also compute
the single-process reference itself and check its own part. A failed check raises; the rank
exits non-zero with the message on stderr (the test prints it).

Legend: W world size, T tokens per rank, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelab.config import DataConfig, ModelConfig, MoEConfig, RunConfig
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.transformer import Transformer
from moelab.moe.capacity import apply_capacity
from moelab.moe.decision import token_choice_decision
from moelab.moe.dispatch.ep import ep_dispatch
from moelab.moe.dispatch.loop import loop_dispatch
from moelab.moe.experts import Experts
from moelab.moe.layer import MoELayer
from moelab.parallel import build_data_parallel, build_layout, fail_together, init_distributed, shard_experts
from moelab.parallel.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from moelab.parallel.expert_parallel import ExpertShard, full_state_dict
from moelab.parallel.train_step import accumulate_step, shard_rows, train_step

TOL = 1e-5
GRAD_CLIP = 0.5  # below the tiny model's gradient norm, so clipping is exercised
D, F_HID, VOCAB, SEQ, GLOBAL_BATCH = 16, 8, 31, 8, 8


def close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.detach() - want.detach()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{name}: max abs diff {err:.3g} > {tol}"


# ----------------------------------------------------------------------------- EP dispatch equality


def make_decision(
    case: str, T: int, E: int, K: int, g: torch.Generator, capacity_factor: float | None = None
):
    """A routing decision for one rank: ``random``, ``one_expert`` (all to E-1), ``empty_expert`` (expert 1 unused)."""
    logits_TE = torch.randn(T, E, generator=g)
    if case == "one_expert":
        expert_TK = torch.full((T, 1), E - 1)
        K = 1
    elif case == "empty_expert":
        logits_TE[:, 1] = -1e9
        expert_TK = logits_TE.topk(K, dim=-1).indices
    else:
        expert_TK = logits_TE.topk(K, dim=-1).indices
    logits_TE = logits_TE.clamp_min(-30).requires_grad_(True)
    scores_TE = logits_TE.softmax(-1)
    weight_TK = scores_TE.gather(1, expert_TK)
    dec = token_choice_decision(expert_TK, weight_TK, logits_TE, scores_TE, (1, T))
    if capacity_factor is not None:
        dec = apply_capacity(dec, capacity_factor, "position", K)
    return dec, logits_TE


def dispatch_case(case: str, E: int, capacity_factor: float | None, uneven: bool = False) -> None:
    """``uneven``: rank r has 10 + 2r tokens (so different capacities in capacity mode)."""
    rank, W = dist.get_rank(), dist.get_world_size()
    Ts = [10 + 2 * r if uneven else 12 for r in range(W)]
    T, K = Ts[rank], 2
    torch.manual_seed(0)
    full = Experts(E, D, F_HID, "swiglu")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(t, D, generator=g).requires_grad_(True) for t in Ts]
    decs = [make_decision(case, t, E, K, g, capacity_factor) for t in Ts]
    cots = [torch.randn(t, D, generator=g) for t in Ts]
    # reference: one process, all experts, every rank's tokens
    ref_y = [loop_dispatch(x, d, full) for x, (d, _) in zip(xs, decs)]
    sum((y * c).sum() for y, c in zip(ref_y, cots)).backward()
    # expert parallel: this rank's tokens, its shard of the experts
    shard_src = Experts(E, D, F_HID, "swiglu")
    shard_src.load_state_dict(full.state_dict())
    holder = torch.nn.Module()
    holder.layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_hidden=F_HID), "swiglu")
    holder.layer.experts = shard_src
    comm = shard_experts(holder, dist.group.WORLD)
    shard: ExpertShard = holder.layer.experts
    x = xs[rank].detach().clone().requires_grad_(True)
    d_ref, logits_ref = decs[rank]
    logits = logits_ref.detach().clone().requires_grad_(True)
    scores = logits.softmax(-1)
    expert_TK = d_ref.expert.view(T, -1)
    weight_TK = scores.gather(1, expert_TK)
    dec = token_choice_decision(expert_TK, weight_TK, logits, scores, (1, T))
    dec = dec.with_kept(d_ref.kept, d_ref.capacity)
    y = ep_dispatch(x, dec, shard)
    (y * cots[rank]).sum().backward()
    tag = f"{case} E={E} cap={capacity_factor} uneven={uneven} rank {rank}"
    close(f"{tag} output", y, ref_y[rank])
    close(f"{tag} grad x", x.grad, xs[rank].grad)
    close(f"{tag} grad router logits", logits.grad, logits_ref.grad)
    sl = slice(shard.first_expert, shard.first_expert + shard.num_experts)
    close(f"{tag} grad w_up", shard.w_up.grad, full.w_up.grad[sl])
    close(f"{tag} grad w_down", shard.w_down.grad, full.w_down.grad[sl])
    assert comm.calls > 0 and (W == 1 or comm.bytes_sent > 0 or case == "one_expert"), (
        f"{tag}: no traffic recorded"
    )


def layer_case(E: int) -> None:
    """A whole MoELayer (real router, shared expert) sharded with shard_experts equals the unsharded one."""
    rank, W = dist.get_rank(), dist.get_world_size()
    cfg = MoEConfig(num_experts=E, top_k=2, expert_hidden=F_HID, num_shared_experts=1)
    torch.manual_seed(0)
    ref = MoELayer(D, cfg, "swiglu")
    layer = MoELayer(D, cfg, "swiglu")
    layer.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 6, D, generator=g) for _ in range(W)]
    outs = [ref(x) for x in xs]
    sum(o.y.square().sum() + o.losses["load_balance"] for o in outs).backward()
    holder = torch.nn.Module()
    holder.layer = layer
    shard_experts(holder, dist.group.WORLD)
    out = layer(xs[rank])
    (out.y.square().sum() + out.losses["load_balance"]).backward()
    close(f"layer rank {rank} output", out.y, outs[rank].y)
    for name, p in layer.named_parameters():
        grad = p.grad.clone()
        if name.startswith("experts."):
            sh = layer.experts
            want = dict(ref.named_parameters())[name].grad[sh.first_expert : sh.first_expert + sh.num_experts]
        else:
            dist.all_reduce(grad)  # each rank holds the gradient of its own tokens' loss
            want = dict(ref.named_parameters())[name].grad
        close(f"layer rank {rank} grad {name}", grad, want)


def check_ep_dispatch(E: int) -> None:
    for case in ("random", "one_expert", "empty_expert"):
        dispatch_case(case, E, None)
    dispatch_case("random", E, 0.75)
    dispatch_case("empty_expert", E, 1.0)
    dispatch_case("random", E, None, uneven=True)
    dispatch_case("random", E, 1.0, uneven=True)
    layer_case(E)


# ----------------------------------------------------------------------------- training equality


def model_config(aux_loss_coef: float = 0.01) -> ModelConfig:
    """Tiny MoE model; ``aux_loss_coef=0`` makes the per-shard balance loss vanish, so any world
    size equals a plain full-batch world-1 run (the z-loss is a token mean, equal either way)."""
    moe = MoEConfig(
        num_experts=4, top_k=2, expert_hidden=F_HID, aux_loss_coef=aux_loss_coef, z_loss_coef=0.001
    )
    return ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        ffn_hidden=32,
        max_seq_len=SEQ,
        moe=moe,
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch; about a fifth of the labels are -100 (shards weigh by labelled tokens)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels[torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.2] = -100
    return ids, labels


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def reference_run(world: int, steps: range, model=None, opt=None, cfg: ModelConfig | None = None):
    """Plain single-process AdamW on the same global batch, with the aux loss of each of the
    ``world`` shards averaged (the documented semantics: balance statistics per shard)."""
    if model is None:
        torch.manual_seed(0)
        model = Transformer(cfg or model_config())
        opt = make_optimizer(model)
    losses = []
    for step in steps:
        ids, labels = global_batch(step)
        n = (labels != -100).sum()
        b = GLOBAL_BATCH // world
        total = 0.0
        for s in range(world):
            out = model(ids[s * b : (s + 1) * b])
            ce = F.cross_entropy(
                out.logits.reshape(-1, VOCAB),
                labels[s * b : (s + 1) * b].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            (ce / n + out.aux_loss / world).backward()
            total += float(ce.detach()) / float(n)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return model, opt, losses


def run_steps(model, opt, layout, mode: str, steps: range, comm=None) -> list[float]:
    """Train ``steps``; ``opt=None`` builds AdamW after wrapping (FSDP2 replaces the parameters)."""
    dp = build_data_parallel(mode, layout)
    wrapped = dp.wrap(model)
    opt = opt or make_optimizer(model)
    losses = []
    for step in steps:
        ids, labels = global_batch(step)
        rows = shard_rows(GLOBAL_BATCH, layout)
        if layout.rank == 1 and step == 1 and "--hang" in sys.argv:
            time.sleep(600)  # a hung rank: its peers must time out, not wait forever
        if layout.rank == 1 and step == 1 and "--bad-data" in sys.argv:
            labels = labels.clone()
            labels[rows.start, 0] = VOCAB + 5
        losses.append(train_step(wrapped, dp, opt, ids[rows], labels[rows], layout, comm, GRAD_CLIP).loss)
    return losses


def check_training(env, mode: str, ep: int, steps: int = 3) -> None:
    """``steps`` distributed steps equal one process on the same global batch (losses, all parameters)."""
    layout = build_layout(env, ep=ep, num_experts=4)
    torch.manual_seed(0)
    model = Transformer(model_config())
    comm = shard_experts(model, layout.ep_group) if ep > 1 else None
    losses = run_steps(model, None, layout, mode, range(steps), comm)
    ref_model, _, ref_losses = reference_run(layout.world_size, range(steps))
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= TOL, f"{mode} ep={ep} step {i}: loss {a} != single-process {b}"
    state = full_state_dict(model)
    for name, want in ref_model.state_dict().items():
        close(f"{mode} ep={ep} rank {env.rank} param {name}", state[name], want)
    if comm is not None:
        assert comm.bytes_sent > 0, "expert parallel run recorded no all-to-all traffic"


def check_bad_step_skipped_together(env) -> None:
    """A non-finite loss on one rank (rank 1's weights poisoned) skips the step on every rank:
    no rank updates, and the next finite step trains again."""
    layout = build_layout(env, ep=1, num_experts=4)
    torch.manual_seed(0)
    model = Transformer(model_config())
    dp = build_data_parallel("manual", layout)
    opt = make_optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if layout.rank == 1:
        with torch.no_grad():
            model.embed.weight[0].fill_(float("nan"))
    ids, labels = global_batch(0)
    ids[:, 0] = 0  # every row reads the poisoned embedding row on rank 1
    rows = shard_rows(GLOBAL_BATCH, layout)
    m = accumulate_step(dp.wrap(model), dp, opt, [(ids[rows], labels[rows])], layout, grad_clip=GRAD_CLIP)
    assert m.skipped and not math.isfinite(m.loss), f"rank {layout.rank}: the NaN step was not skipped ({m})"
    if layout.rank == 0:
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"rank 0 updated {k} on a skipped step"
    assert not opt.state, "the optimizer stepped on a skipped step"


# ----------------------------------------------------------------------------- checkpoints across world sizes


CKPT_STEPS = 2  # steps before the checkpoint, and after resuming


def save_after_steps(env, folder: str, ep: int) -> None:
    """Train CKPT_STEPS steps without balance loss (see model_config) and save a gathered checkpoint."""
    layout = build_layout(env, ep=ep, num_experts=4)
    cfg = model_config(aux_loss_coef=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    comm = shard_experts(model, layout.ep_group) if ep > 1 else None
    opt = make_optimizer(model)
    run_steps(model, opt, layout, "ddp", range(CKPT_STEPS), comm)
    run_cfg = RunConfig(model=cfg, data=DataConfig(seq_len=SEQ))
    save_sharded_checkpoint(
        folder, model, opt, run_cfg, BytesTokenizer(), layout, make_optimizer, {"step": CKPT_STEPS}
    )


def resume_and_train(env, folder: str, ep: int, result: str) -> None:
    """Resume at this world size; rank 0 writes the losses of the next CKPT_STEPS steps to ``result``."""
    layout = build_layout(env, ep=ep, num_experts=4)
    model, opt, state, _ = load_sharded_checkpoint(folder, layout, make_optimizer)
    assert state["step"] == CKPT_STEPS, state
    comm = (
        model.moe_layers[0].experts.ep.comm if isinstance(model.moe_layers[0].experts, ExpertShard) else None
    )
    losses = run_steps(model, opt, layout, "ddp", range(CKPT_STEPS, 2 * CKPT_STEPS), comm)
    if env.is_main:
        Path(result).write_text(json.dumps(losses))


def scenario_world2(folder: str) -> None:
    """World 2: EP dispatch (E=4), training with ddp (dp=2), manual and fsdp (ep=2), then a checkpoint."""
    env = init_distributed(timeout_s=60)
    with fail_together(env):
        check_ep_dispatch(4)
        for mode, ep in (("ddp", 1), ("manual", 2), ("fsdp", 2)):
            check_training(env, mode, ep)
        check_bad_step_skipped_together(env)
        save_after_steps(env, folder, ep=2)


def scenario_world4(folder: str, result: str) -> None:
    """World 4: EP dispatch (E=8, two experts a rank), training dp=2 × ep=2, resume the world-2 checkpoint."""
    env = init_distributed(timeout_s=60)
    with fail_together(env):
        check_ep_dispatch(8)
        check_training(env, "ddp", 2)
        resume_and_train(env, folder, ep=2, result=result)


# ----------------------------------------------------------------------------- failure


def scenario_fail(timeout_s: str = "20") -> None:
    """Rank 1 gets a label outside the vocabulary (``--bad-data``) or hangs (``--hang``) at step 1;
    every rank must exit, none wait forever."""
    env = init_distributed(timeout_s=float(timeout_s))
    with fail_together(env):
        layout = build_layout(env, ep=1, num_experts=4)
        torch.manual_seed(0)
        model = Transformer(model_config())
        run_steps(model, make_optimizer(model), layout, "ddp", range(3))


SCENARIOS = {"world2": scenario_world2, "world4": scenario_world4, "fail": scenario_fail}

if __name__ == "__main__":
    torch.set_num_threads(1)
    SCENARIOS[sys.argv[1]](*[a for a in sys.argv[2:] if not a.startswith("--")])
    if dist.is_initialized():
        dist.destroy_process_group()
