"""Expert pruning and merging: fewer experts, router rows updated to match.

**Pruning** removes experts, typically the dead or rare ones of a routing trace
(:func:`expert_counts`). Every per-expert router tensor (gate rows, sigmoid bias, noise rows…)
loses the same rows. With renormalised top-k, removing an expert that no token chooses leaves
every output unchanged: the choices and their renormalised weights do not involve it.

**Merging** replaces each group of experts by their frequency-weighted average (weights
``f_i / Σ f`` from the trace; uniform without one), as in MC-SMoE / HC-SMoE-style merging; the
group's router rows are averaged with the same weights. Groups come from similarity
(:func:`similar_groups`: average-linkage clustering on the cosine similarity of expert weights
or router rows). Merging identical experts (same weights and router rows) leaves the outputs of a
top-1 model unchanged; with k > 1 the token's other choices can change, which is the point of
reporting the loss after merging.

One ``MoEConfig`` serves every layer, so each MoE layer keeps the same number of experts.

Legend: E experts before, E' after, D model dim, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from moelab.config import ConfigError
from moelab.model.transformer import Transformer


@torch.no_grad()
def expert_counts(model: Transformer, batches: Iterable[Tensor]) -> dict[int, Tensor]:
    """Layer → ``[E]`` kept assignments per expert over ``batches`` of token ids ``[B, S]``."""
    was_training = model.training
    model.eval()
    counts: dict[int, Tensor] = {}
    for ids in batches:
        out = model(ids, return_routing=True)
        for layer, decision in (out.routing or {}).items():
            c = decision.tokens_per_expert().cpu()
            counts[layer] = counts[layer] + c if layer in counts else c
    model.train(was_training)
    return counts


def _rebuild(
    model: Transformer, groups: Mapping[int, Sequence[Sequence[int]]], weights: Mapping[int, Tensor]
) -> Transformer:
    """New model whose layer-``i`` expert j is ``Σ_{e in groups[i][j]} w_e · old expert e`` (w normalised per group)."""
    cfg = model.cfg
    if cfg.moe is None:
        raise ConfigError("model.moe is null: there are no experts to prune or merge")
    layers = cfg.moe_layers
    sizes = {len(groups[i]) for i in layers if i in groups}
    if set(groups) != set(layers) or len(sizes) != 1:
        raise ConfigError(
            f"give every MoE layer {layers} the same number of experts after pruning/merging; got "
            f"{ {i: len(g) for i, g in groups.items()} }"
        )
    E_new = sizes.pop()
    if E_new < cfg.moe.top_k:
        raise ConfigError(f"{E_new} experts left but moe.top_k={cfg.moe.top_k}: lower top_k first")
    new_cfg = replace(cfg, moe=replace(cfg.moe, num_experts=E_new))
    new = Transformer(new_cfg)
    old_state, new_state = model.state_dict(), new.state_dict()
    E = cfg.moe.num_experts
    for k, v in new_state.items():
        if k in old_state and old_state[k].shape == v.shape:
            v.copy_(old_state[k])
    for i in layers:
        w_E = weights[i].double()
        prefix = f"blocks.{i}.ffn."
        for k in old_state:
            if not k.startswith(prefix) or k.startswith(prefix + "shared"):
                continue
            old = old_state[k]
            if old.dim() == 0 or old.shape[0] != E:
                continue
            rows = []
            for members in groups[i]:
                m = torch.as_tensor(list(members), dtype=torch.long)
                if len(m) == 0 or int(m.min()) < 0 or int(m.max()) >= E:
                    raise ConfigError(
                        f"layer {i}: expert group {list(members)} must name experts in [0, {E})"
                    )
                w = w_E[m] / w_E[m].sum()
                rows.append((old[m].double() * w.view(-1, *[1] * (old.dim() - 1))).sum(0).to(old.dtype))
            new_state[k].copy_(torch.stack(rows))
    return new.train(model.training)


@torch.no_grad()
def prune_experts(model: Transformer, keep: Mapping[int, Sequence[int]]) -> Transformer:
    """Keep only ``keep[layer]`` experts (same count in every MoE layer), in the given order."""
    groups = {i: [[e] for e in experts] for i, experts in keep.items()}
    return _rebuild(model, groups, {i: torch.ones(model.cfg.moe.num_experts) for i in keep})  # type: ignore[union-attr]


def rare_experts(counts: Mapping[int, Tensor], num_remove: int) -> dict[int, list[int]]:
    """Per layer, the experts to keep after removing the ``num_remove`` least used (dead first)."""
    keep = {}
    for i, c in counts.items():
        order = torch.argsort(c, stable=True)  # ascending: rarest first
        keep[i] = sorted(order[num_remove:].tolist())
    return keep


@torch.no_grad()
def merge_experts(
    model: Transformer,
    groups: Mapping[int, Sequence[Sequence[int]]],
    counts: Mapping[int, Tensor] | None = None,
) -> Transformer:
    """Merge each group of experts into one by frequency-weighted averaging (uniform without counts)."""
    E = model.cfg.moe.num_experts  # type: ignore[union-attr]
    weights = {i: (counts[i].double() + 1e-6) if counts is not None else torch.ones(E) for i in groups}
    return _rebuild(model, groups, weights)


def similar_groups(model: Transformer, layer: int, num_groups: int, by: str = "weight") -> list[list[int]]:
    """Average-linkage clustering of layer ``layer``'s experts into ``num_groups`` groups by cosine similarity.

    ``by='weight'``: the flattened expert weights; ``by='router'``: the router rows.
    """
    ffn = model.blocks[layer].ffn
    if by == "weight":
        feats = torch.cat([ffn.experts.w_up.flatten(1), ffn.experts.w_down.flatten(1)], 1)
    elif by == "router":
        feats = ffn.router.gate.weight
    else:
        raise ConfigError(f"by={by!r} is invalid: expected 'weight' or 'router'")
    feats = torch.nn.functional.normalize(feats.detach().double(), dim=1)
    sim = feats @ feats.t()
    clusters = [[e] for e in range(feats.shape[0])]
    while len(clusters) > num_groups:
        best, pair = -float("inf"), (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                s = float(sim[clusters[a]][:, clusters[b]].mean())
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return clusters


def merge_similar(
    model: Transformer, num_experts: int, counts: Mapping[int, Tensor] | None = None, by: str = "weight"
) -> Transformer:
    """Merge every MoE layer down to ``num_experts`` experts, grouping similar ones."""
    groups = {i: similar_groups(model, i, num_experts, by) for i in model.cfg.moe_layers}
    return merge_experts(model, groups, counts)
