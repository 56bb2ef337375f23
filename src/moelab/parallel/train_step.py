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

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import UserError
from moelab.moe.dispatch.ep import CommStats
from moelab.parallel.expert_parallel import is_expert_param
from moelab.parallel.mesh import ParallelLayout
from moelab.parallel.wrap import DataParallel, unwrap

IGNORE_INDEX = -100


@dataclass
class StepMetrics:
    """Reduced over all ranks: identical on every rank."""

    loss: float  # global-batch LM loss (token mean)
    aux_loss: float  # weighted router aux loss, mean over ranks
    tokens: int  # labelled tokens in the global batch
    a2a_bytes: int  # all-to-all bytes sent by all ranks this step (forward + backward)


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
    """Forward, backward, gradient sync, optimizer step on this rank's shard; metrics reduced.

    ``model`` is what ``data_parallel.wrap`` returned; ``input_ids_BS``/``labels_BS`` are this
    rank's rows (:func:`shard_rows`). Collective: every rank must call it once per step.
    """
    W = layout.world_size
    check_finite_labels(labels_BS, unwrap(model).cfg.vocab_size)
    local_tokens = int((labels_BS != IGNORE_INDEX).sum())
    (global_tokens,) = all_reduce_sum([float(local_tokens)], layout)
    if global_tokens == 0:
        raise UserError("the global batch has no labelled tokens: check the data")
    if comm is not None:
        comm.reset()
    out = model(input_ids_BS)
    logits = out.logits.float()
    ce_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    aux = out.aux_loss if out.aux_loss is not None else ce_sum.new_zeros(())
    objective = W * ce_sum / global_tokens + aux
    objective.backward()
    data_parallel.sync(model)
    if grad_clip > 0:
        clip_grad_norm(model, grad_clip, layout)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sent = comm.bytes_sent if comm is not None else 0
    ce_total, aux_total, bytes_total = all_reduce_sum(
        [float(ce_sum.detach()), float(aux.detach()), float(sent)], layout
    )
    return StepMetrics(
        loss=ce_total / global_tokens,
        aux_loss=aux_total / W,
        tokens=int(global_tokens),
        a2a_bytes=int(bytes_total),
    )
