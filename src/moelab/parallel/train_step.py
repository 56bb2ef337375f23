"""One distributed training step as library functions (the trainer calls these under torchrun).

Semantics, chosen so that W ranks reproduce one process on the same global batch:
- **Global batch**: ``global_batch`` sequences per optimizer step, split into W equal,
  contiguous, non-overlapping shards: rank r takes rows ``[r·b, (r+1)·b)``, b = global/W.
  The learning rate is that of the global batch; it does not change with W.
- **LM loss** is the mean over every labelled token of the global batch (token-weighted, so
  shards with more ``-100`` labels weigh less), not the mean of per-rank means.
- **Router aux losses** are computed per rank on its shard (like per micro-batch with
  gradient accumulation) and averaged over ranks: balance statistics are per shard.
- Each rank backpropagates ``W·CE_sum_r / N + aux_r``; the data-parallel sync divides by W,
  which leaves every rank with the gradient of ``Σ_r CE_sum_r / N + mean_r aux_r``.

Legend: W world size, B sequences per rank, S sequence length, V vocab, N labelled tokens in
the global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import IGNORE_INDEX
from moelab.errors import UserError
from moelab.moe.dispatch.ep import CommStats
from moelab.moe.stats import LayerStats, RoutingStats
from moelab.parallel.expert_parallel import is_expert_param
from moelab.parallel.mesh import ParallelLayout
from moelab.parallel.wrap import DataParallel, unwrap


@dataclass
class StepMetrics:
    """Reduced over all ranks: identical on every rank."""

    loss: float  # global-batch LM loss (token mean)
    aux_loss: float  # weighted router aux loss, mean over ranks
    tokens: int  # labelled tokens in the global batch
    a2a_bytes: int  # all-to-all bytes sent by all ranks this step (forward + backward)
    grad_norm: float = float("nan")  # global gradient norm before clipping
    skipped: bool = False  # non-finite loss or gradient: no update on any rank
    routing: RoutingStats = field(default_factory=lambda: RoutingStats({}))  # global-batch routing statistics


def shard_rows(global_rows: int, layout: ParallelLayout) -> slice:
    """This rank's rows of a global batch of ``global_rows`` sequences (equal, contiguous, disjoint)."""
    W = layout.world_size
    if global_rows % W:
        raise UserError(
            f"global batch of {global_rows} sequences does not split over {W} ranks: use a multiple of {W}"
        )
    b = global_rows // W
    return slice(layout.rank * b, (layout.rank + 1) * b)


def all_reduce_sum(values: list[float], layout: ParallelLayout) -> list[float]:
    """Sum floats over all ranks (fp64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=layout.env.device)
    if dist.is_initialized() and layout.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def check_finite_labels(labels_BS: Tensor, vocab_size: int) -> None:
    """Bad data on one shard must fail loudly (and, under ``fail_together``, end the job)."""
    bad = (labels_BS != IGNORE_INDEX) & ((labels_BS < 0) | (labels_BS >= vocab_size))
    if bool(bad.any()):
        raise UserError(
            f"labels outside the vocabulary [0, {vocab_size}) in this rank's shard: check the data"
        )


def clip_grad_norm(model: nn.Module, max_norm: float, layout: ParallelLayout) -> float:
    """Clip by the norm of the *global* gradient, as one process would (``clip_grad_norm_``).

    Squares are summed locally, over each FSDP2 shard's mesh (DTensor gradients), then expert
    squares over the ep group (each ep rank holds different experts).
    """
    dense_sq, expert_sq = [], []
    params, seen = [], set()
    for name, p in unwrap(model).named_parameters():
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        params.append(p)
        g = p.grad.detach()
        if hasattr(g, "to_local"):  # FSDP2 shard: reduce its squares over the shard's mesh
            sq = g.to_local().double().pow(2).sum()
            if dist.is_initialized():
                dist.all_reduce(sq, group=g.device_mesh.get_group())
        else:
            sq = g.double().pow(2).sum()
        (expert_sq if is_expert_param(name) else dense_sq).append(sq.reshape(()))
    zero = torch.zeros((), dtype=torch.float64, device=layout.env.device)
    dense = torch.stack(dense_sq).sum() if dense_sq else zero
    expert = torch.stack(expert_sq).sum() if expert_sq else zero.clone()
    if dist.is_initialized() and layout.ep > 1:
        dist.all_reduce(expert, group=layout.ep_group)
    norm = float((dense + expert).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm


def train_step(
    model: nn.Module,
    data_parallel: DataParallel,
    optimizer: torch.optim.Optimizer,
    input_ids_BS: Tensor,
    labels_BS: Tensor,
    layout: ParallelLayout,
    comm: CommStats | None = None,
    grad_clip: float = 0.0,
) -> StepMetrics:
    """One micro-batch per step: :func:`accumulate_step` with a single ``(input_ids, labels)``."""
    return accumulate_step(model, data_parallel, optimizer, [(input_ids_BS, labels_BS)], layout, comm, grad_clip)


def accumulate_step(
    model: nn.Module,
    data_parallel: DataParallel,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, Tensor]],
    layout: ParallelLayout,
    comm: CommStats | None = None,
    grad_clip: float = 0.0,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    before_step: Callable[[RoutingStats], None] | None = None,
) -> StepMetrics:
    """Forward and backward of every micro-batch, one gradient sync, clip, optimizer step.

    ``micro_batches`` are this rank's rows of each of the step's global micro-batches
    (:func:`shard_rows` of each). Each micro-batch's objective is scaled by ``1/A`` as the
    one-process trainer's accumulation does, with the token mean taken over that global
    micro-batch, so W ranks × A micro-batches equal one process × A micro-batches. Gradients are
    synchronised once, after the last backward (DDP's ``no_sync`` before it).

    The step is skipped on every rank together when the global loss or the global gradient norm
    is not finite (both are reduced before the decision). ``before_step`` receives the routing
    statistics of the whole global batch (loads summed over ranks) between backward and the
    optimizer step: the aux-loss-free bias update needs the same loads on every rank.
    Collective: every rank must call it once per step with the same number of micro-batches.
    """
    W, A = layout.world_size, len(micro_batches)
    inner = unwrap(model)
    for _, labels_BS in micro_batches:
        check_finite_labels(labels_BS, inner.cfg.vocab_size)
    local_tokens = [float(int((labels != IGNORE_INDEX).sum())) for _, labels in micro_batches]
    global_tokens = all_reduce_sum(local_tokens, layout)
    if min(global_tokens) == 0:
        raise UserError("a global micro-batch has no labelled tokens: check the data")
    if comm is not None:
        comm.reset()
    has_moe = bool(inner.moe_layers)
    ce_sums, auxes, stats = [], [], []
    for i, (input_ids_BS, labels_BS) in enumerate(micro_batches):
        no_sync = data_parallel.no_sync(model) if i < A - 1 else contextlib.nullcontext()
        with no_sync:
            with autocast():
                out = model(input_ids_BS, return_routing=has_moe)
            logits = out.logits.float()
            ce_sum = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            aux = out.aux_loss if out.aux_loss is not None else ce_sum.new_zeros(())
            ((W * ce_sum / global_tokens[i] + aux) / A).backward()
        ce_sums.append(float(ce_sum.detach()))
        auxes.append(float(aux.detach()))
        if out.routing:
            stats.append(RoutingStats.from_routing(out.routing))
    data_parallel.sync(model)
    sent = comm.bytes_sent if comm is not None else 0
    reduced = all_reduce_sum([*ce_sums, *auxes, float(sent)], layout)
    loss = sum(c / n for c, n in zip(reduced[:A], global_tokens)) / A  # mean of micro-batch token means
    aux_loss = sum(reduced[A : 2 * A]) / (A * W)
    routing = all_reduce_stats(sum(stats[1:], stats[0]), layout) if stats else RoutingStats({})
    grad_norm = clip_grad_norm(model, grad_clip if math.isfinite(loss) else 0.0, layout)
    skipped = not (math.isfinite(loss) and math.isfinite(aux_loss) and math.isfinite(grad_norm))
    if not skipped:
        if before_step is not None:
            before_step(routing)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepMetrics(
        loss=loss,
        aux_loss=aux_loss,
        tokens=int(sum(global_tokens)),
        a2a_bytes=int(reduced[-1]),
        grad_norm=grad_norm,
        skipped=skipped,
        routing=routing,
    )


def all_reduce_stats(stats: RoutingStats, layout: ParallelLayout) -> RoutingStats:
    """Routing statistics of the global batch: loads summed over every rank, rates weighted by counts.

    Every rank routes its own tokens over all E experts (routers are replicated, also under ep),
    so the sum over the world is the global batch's load, as one process would count it.
    """
    if not (dist.is_initialized() and layout.world_size > 1) or not stats.layers:
        return stats
    layers = sorted(stats.layers)
    rows = []
    for i in layers:
        s = stats.layers[i]
        n = float(s.load.sum())
        rows.append(torch.cat([
            s.load.double(), s.kept_load.double(),
            torch.tensor([s.drop_rate * n, s.mean_top1_prob * s.num_tokens, float(s.num_tokens), n], dtype=torch.float64),
        ]))  # fmt: skip
    flat = torch.cat(rows).to(layout.env.device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    out, offset = {}, 0
    for i, row in zip(layers, rows):
        E = stats.layers[i].load.numel()
        part = flat[offset : offset + row.numel()]
        offset += row.numel()
        drop_n, top1_n, tokens, n = part[2 * E :].tolist()
        out[i] = LayerStats(
            load=part[:E].round().long(),
            kept_load=part[E : 2 * E].round().long(),
            drop_rate=drop_n / n if n > 0 else 0.0,
            mean_top1_prob=top1_n / tokens if tokens > 0 else stats.layers[i].mean_top1_prob,
            num_tokens=int(tokens),
        )
    return RoutingStats(out)
