"""Expert-parallel dispatch (GShard): experts live on different ranks, tokens travel by all-to-all.

Each rank of an expert-parallel group of size P holds ``E_l = E / P`` consecutive experts (rank
p holds experts ``[p·E_l, (p+1)·E_l)``) and its own tokens. One MoE layer does:

1. sort the kept assignments by expert, so by destination rank;
2. exchange counts (``[E]`` per rank → ``[P, E_l]`` received), then token rows with
   ``all_to_all_single`` and uneven splits;
3. regroup the received rows by local expert and run the local experts
   (``Experts.forward``, the grouped local backend);
4. send the outputs back the same way (inverse splits) and combine them with the weights.

Capacity mode (``decision.capacity`` set by a capacity policy): every rank sends a fixed
``[E, C, D]`` buffer (zero rows where an expert has fewer than C assignments), so splits are
even and shapes static: GShard's layout. C is each rank's own capacity (drops are decided
locally); the buffer uses the largest C of the group so ranks with fewer tokens still agree. Dropless mode sends exactly the kept rows.

The all-to-all is an autograd function whose backward is the inverse all-to-all, so gradients
reach tokens on other ranks and the local experts see gradients from every rank's tokens.
Every rank must call the layer the same number of times (a collective): ranks with no tokens
still take part, and their outputs stay connected to the graph so backward runs everywhere.

The process group is not in any config: ``moelab.parallel.shard_experts`` puts an
:class:`EPGroup` on each layer's experts (``experts.ep``). Experts without one (a single
process) run every expert locally: P = 1, nothing is sent.

Legend: T tokens, D model dim, E experts, L local experts (E_l), P ranks in the ep group,
A assignments, S kept assignments sorted by expert, R rows received, C capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moelab.moe.decision import RoutingDecision
from moelab.moe.dispatch.base import DISPATCHERS
from moelab.moe.experts import Experts


@dataclass
class CommStats:
    """All-to-all traffic of one rank, forward and backward, in bytes (token rows and counts)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def add(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls += 1

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.calls = 0


@dataclass
class EPGroup:
    """The expert-parallel group a layer's experts are sharded over (held by the module, not a config)."""

    group: object | None  # torch.distributed.ProcessGroup; None = single process
    size: int = 1
    rank: int = 0
    comm: CommStats = field(default_factory=CommStats)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; backward is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, out_splits: list[int], in_splits: list[int], ep: EPGroup) -> Tensor:  # type: ignore[override]
        ctx.splits, ctx.ep = (out_splits, in_splits), ep
        return _exchange(x_ND, out_splits, in_splits, ep)

    @staticmethod
    def backward(ctx, g_ND: Tensor):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _exchange(g_ND, in_splits, out_splits, ctx.ep), None, None, None


def _exchange(x_ND: Tensor, out_splits: list[int], in_splits: list[int], ep: EPGroup) -> Tensor:
    out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
    row = math.prod(x_ND.shape[1:]) * x_ND.element_size()
    if ep.group is None or ep.size == 1:
        out.copy_(x_ND)
    else:
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=ep.group)
    me = ep.rank
    ep.comm.add(row * (sum(in_splits) - in_splits[me]), row * (sum(out_splits) - out_splits[me]))
    return out


def all_to_all(x_ND: Tensor, out_splits: list[int], in_splits: list[int], ep: EPGroup) -> Tensor:
    """Send ``in_splits[p]`` rows to rank p, receive ``out_splits[p]`` rows from rank p (autograd-aware)."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, ep)


def exchange_counts(counts_E: Tensor, ep: EPGroup) -> Tensor:
    """``[E]`` rows this rank sends to each expert → ``[P, L]`` rows each rank sends to my experts."""
    P = ep.size
    recv = all_to_all(counts_E, [counts_E.numel() // P] * P, [counts_E.numel() // P] * P, ep)
    return recv.view(P, -1)


def _group_max(value: int, ep: EPGroup, device: torch.device) -> int:
    if ep.group is None or ep.size == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ep.group)
    return int(t.item())


def _keep_in_graph(y: Tensor, *inputs: Tensor) -> Tensor:
    """``y`` plus an exact zero depending on ``inputs``, so backward (a collective) runs on every rank
    even when this rank's experts received no rows."""
    if y.requires_grad:
        return y
    for t in inputs:
        if t.requires_grad:
            y = y + t.sum() * 0
    return y


def _ep_of(experts: Experts, num_experts: int) -> EPGroup:
    ep = getattr(experts, "ep", None) or EPGroup(group=None)
    if experts.num_experts * ep.size != num_experts:
        raise ValueError(
            f"ep dispatch: {experts.num_experts} local experts × {ep.size} ranks != {num_experts} experts in the decision"
        )
    return ep


def _local_experts(experts: Experts, x_RD: Tensor, rows_L: list[int]) -> Tensor:
    y_RD = experts(x_RD, rows_L)
    # plain weights get an exact zero gradient too; FSDP2's DTensor shards are only valid inside forward
    weights = [w for w in (experts.w_up, experts.w_down) if type(w.data) is torch.Tensor]
    return _keep_in_graph(y_RD, x_RD, *weights)


@DISPATCHERS.register("ep")
def ep_dispatch(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    """Expert-parallel ``[T, D] → [T, D]``; equals ``loop`` on the same experts (see module doc)."""
    ep = _ep_of(experts, decision.num_experts)
    (idx_S,) = torch.nonzero(decision.kept, as_tuple=True)
    order = torch.argsort(decision.expert[idx_S], stable=True)
    idx_S = idx_S[order]
    expert_S, token_S = decision.expert[idx_S], decision.token[idx_S]
    if decision.capacity is not None:
        y_SD = _capacity_path(x_TD, expert_S, token_S, decision.num_experts, decision.capacity, experts, ep)
    else:
        y_SD = _dropless_path(x_TD, expert_S, token_S, decision.num_experts, experts, ep)
    weight_S1 = decision.weight[idx_S].unsqueeze(-1).to(y_SD.dtype)
    return y_SD.new_zeros(x_TD.shape).index_add(0, token_S, y_SD * weight_S1)


def _dropless_path(
    x_TD: Tensor, expert_S: Tensor, token_S: Tensor, E: int, experts: Experts, ep: EPGroup
) -> Tensor:
    """Exactly the kept rows travel: uneven splits from exchanged counts."""
    P, L = ep.size, experts.num_experts
    counts_E = torch.bincount(expert_S, minlength=E)
    recv_PL = exchange_counts(counts_E, ep)
    send = counts_E.view(P, L).sum(1).tolist()
    recv = recv_PL.sum(1).tolist()
    x_RD = all_to_all(x_TD[token_S], recv, send, ep)
    # received rows are grouped by source rank, then by local expert: regroup by local expert
    local_R = torch.repeat_interleave(torch.arange(L, device=x_TD.device).repeat(P), recv_PL.reshape(-1))
    perm_R = torch.argsort(local_R, stable=True)
    y_grouped = _local_experts(experts, x_RD[perm_R], recv_PL.sum(0).tolist())
    y_RD = torch.empty_like(y_grouped).index_copy(0, perm_R, y_grouped)
    return all_to_all(y_RD, send, recv, ep)


def _capacity_path(
    x_TD: Tensor, expert_S: Tensor, token_S: Tensor, E: int, C: int, experts: Experts, ep: EPGroup
) -> Tensor:
    """Fixed ``[E, C, D]`` buffers: even splits, static shapes, zero rows where an expert is short."""
    P, L, D = ep.size, experts.num_experts, x_TD.shape[1]
    counts_E = torch.bincount(expert_S, minlength=E)
    most = int(counts_E.max()) if counts_E.numel() else 0
    if most > C:
        raise ValueError(f"ep dispatch: an expert has {most} kept assignments, capacity is {C}")
    C = _group_max(C, ep, x_TD.device)  # ranks with fewer tokens have a smaller C: buffers must agree
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_S = expert_S * C + torch.arange(expert_S.numel(), device=x_TD.device) - starts_E[expert_S]
    send_ECD = x_TD.new_zeros(E * C, D).index_copy(0, slot_S, x_TD[token_S])
    even = [L * C] * P
    recv_PLCD = all_to_all(send_ECD, even, even, ep).view(P, L, C, D)
    x_LPCD = recv_PLCD.transpose(0, 1).reshape(L * P * C, D)
    y_LPCD = _local_experts(experts, x_LPCD, [P * C] * L)
    y_PLCD = y_LPCD.view(L, P, C, D).transpose(0, 1).reshape(P * L * C, D)
    return all_to_all(y_PLCD, even, even, ep)[slot_S]
