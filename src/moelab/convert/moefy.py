"""MoEfication (Zhang et al. 2022): split a trained dense FFN into experts without retraining it.

For every dense FFN layer:

1. **Calibrate.** Run the dense model on calibration tokens and record, per FFN, its inputs
   ``x [N, D]`` and hidden activations ``h [N, F]`` (after SwiGLU/GELU).
2. **Split the neurons** into E experts of F/E neurons each. ``cluster``: balanced k-means on
   the neurons' co-activation patterns (each neuron is the unit vector of |h[:, i]| over the N
   calibration tokens, so neurons that fire together land together); ``random``: a random
   balanced partition (the baseline the clustering must beat).
3. **Build a router** predicting which experts matter for a token. ``learned``: a linear map
   trained on the calibration set to the experts' importance ``s_e = Σ_{i∈e} |h_i|`` (soft
   cross-entropy); ``centroid``: the sum of the expert's first-layer (gate) rows, Zhang et al.'s
   parameter-centre router.
4. Expert e holds exactly its neurons' rows of ``w_up`` and columns of ``w_down``; the MoE
   layer uses the ``topk_unweighted`` router (the chosen experts are *summed*, as in the dense
   FFN), so with k = E the model is the dense model again, and with k < E a token skips the
   (predicted) least important neurons.

:func:`moefy_report` gives the LM loss of the MoEfied model against the dense one for several k.

Legend: N calibration tokens, D model dim, F dense hidden, E experts, f = F/E expert hidden.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import IGNORE_INDEX, ConfigError, MoEConfig, RouterConfig
from moelab.errors import UserError
from moelab.model.guards import require_decoder_only
from moelab.model.transformer import Transformer
from moelab.nn.activations import activate, up_multiplier

SPLITS = ("cluster", "random")
ROUTERS = ("learned", "centroid")


@torch.no_grad()
def ffn_activations(model: Transformer, batches: Iterable[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
    """Dense layer → (FFN inputs ``x [N, D]``, hidden activations ``h [N, F]``) over ``batches``."""
    captured: dict[int, list[Tensor]] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            hooks.append(
                block.ffn.register_forward_hook(
                    lambda mod, args, out, i=i: captured.setdefault(i, []).append(args[0].detach())
                )
            )
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    result = {}
    for i, xs in captured.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()
        ffn = model.blocks[i].ffn
        result[i] = (x, activate(F.linear(x, ffn.w_up.weight.float()), ffn.activation))
    return result


def balanced_kmeans(feats_FN: Tensor, num_clusters: int, iters: int = 30, seed: int = 0) -> Tensor:
    """``[F]`` cluster of each row, exactly F/E rows per cluster (cosine k-means, greedy balanced assignment)."""
    n = feats_FN.shape[0]
    cap = n // num_clusters
    x = F.normalize(feats_FN.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=gen)[:num_clusters]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centers.t()  # [F, E]
        order = torch.argsort(sim.flatten(), descending=True)
        new = torch.full((n,), -1, dtype=torch.long)
        fill = torch.zeros(num_clusters, dtype=torch.long)
        for flat in order.tolist():  # best (neuron, cluster) pairs first, respecting capacity
            i, c = divmod(flat, num_clusters)
            if new[i] < 0 and fill[c] < cap:
                new[i], fill[c] = c, fill[c] + 1
        if torch.equal(new, labels):
            break
        labels = new
        centers = F.normalize(torch.stack([x[labels == c].mean(0) for c in range(num_clusters)]), dim=1)
    return labels


def split_neurons(h_NF: Tensor, num_experts: int, method: str = "cluster", seed: int = 0) -> Tensor:
    """``[F]`` expert of each neuron (balanced: F/E neurons each)."""
    F_ = h_NF.shape[1]
    if method == "random":
        perm = torch.randperm(F_, generator=torch.Generator().manual_seed(seed))
        labels = torch.empty(F_, dtype=torch.long)
        labels[perm] = torch.arange(F_) % num_experts
        return labels
    if method == "cluster":
        return balanced_kmeans(h_NF.abs().t(), num_experts, seed=seed)
    raise ConfigError(f"split={method!r} is invalid: expected one of {', '.join(SPLITS)}")


def learn_router(
    x_ND: Tensor, importance_NE: Tensor, steps: int = 200, lr: float = 2e-2, seed: int = 0
) -> Tensor:
    """``[E, D]`` linear router fitted to the experts' normalised importance by soft cross-entropy.

    Full-batch Adam written out (a few lines; avoids the optimizer machinery's start-up cost).
    """
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(importance_NE.shape[1], x_ND.shape[1], generator=gen) * 0.01).requires_grad_(True)
    target = importance_NE / importance_NE.sum(1, keepdim=True).clamp_min(1e-12)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    b1, b2 = 0.9, 0.999
    with torch.enable_grad():
        for t in range(1, steps + 1):
            loss = -(target * F.log_softmax(x_ND @ w.t(), dim=-1)).sum(1).mean()
            (grad,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                w -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8)
    return w.detach()


@torch.no_grad()
def moefy(
    model: Transformer,
    batches: Sequence[Tensor],
    num_experts: int,
    top_k: int,
    split: str = "cluster",
    router: str = "learned",
    seed: int = 0,
) -> Transformer:
    """Every dense FFN of ``model`` becomes an MoE layer of ``num_experts`` neuron groups."""
    require_decoder_only(model, "moefy")
    cfg = model.cfg
    if cfg.moe is not None:
        raise UserError("MoEfication needs a dense model: this one already has model.moe")
    if cfg.mlp_bias or cfg.gelu_approx != "none":
        raise ConfigError(
            "MoEfication needs bias-free FFNs with swiglu or exact gelu (model.mlp_bias, model.gelu_approx)"
        )
    if router not in ROUTERS:
        raise ConfigError(f"router={router!r} is invalid: expected one of {', '.join(ROUTERS)}")
    if cfg.layer_ffn_hidden or cfg.ffn_hidden % num_experts:
        raise ConfigError(
            f"moe.num_experts={num_experts!r} must divide model.ffn_hidden={cfg.ffn_hidden} (one size for all layers)"
        )
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=cfg.ffn_hidden // num_experts,
        router=RouterConfig(name="topk_unweighted"),
        aux_loss_coef=0.0,
    )
    new = Transformer(replace(cfg, moe=moe))
    old_state, new_state = model.state_dict(), new.state_dict()
    for k, v in new_state.items():
        if k in old_state and old_state[k].shape == v.shape:
            v.copy_(old_state[k])
    acts = ffn_activations(model, batches)
    for i in range(cfg.n_layers):
        x_ND, h_NF = acts[i]
        labels = split_neurons(h_NF, num_experts, split, seed)
        dense, layer = model.blocks[i].ffn, new.blocks[i].ffn
        halves = dense.w_up.weight.chunk(2, 0) if up_multiplier(cfg.activation) == 2 else (dense.w_up.weight,)
        for e in range(num_experts):
            idx = (labels == e).nonzero().squeeze(1)
            layer.experts.w_up[e].copy_(torch.cat([p[idx] for p in halves], 0))
            layer.experts.w_down[e].copy_(dense.w_down.weight[:, idx])
        if router == "centroid":
            gate = torch.stack([halves[0][labels == e].sum(0) for e in range(num_experts)])
        else:
            importance_NE = torch.zeros(h_NF.shape[0], num_experts).index_add_(1, labels, h_NF.abs())
            gate = learn_router(x_ND, importance_NE, seed=seed)
        layer.router.gate.weight.copy_(gate)
    return new.eval()


def with_top_k(model: Transformer, top_k: int) -> Transformer:
    """The same MoE weights with a different ``top_k``."""
    assert model.cfg.moe is not None
    new = Transformer(replace(model.cfg, moe=replace(model.cfg.moe, top_k=top_k)))
    new.load_state_dict(model.state_dict())
    return new.eval()


@torch.no_grad()
def lm_loss(model: Transformer, batches: Iterable[Tensor]) -> float:
    """Mean next-token cross-entropy over ``batches`` of token ids ``[B, S]``."""
    model.eval()
    total, count = 0.0, 0
    for ids in batches:
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        out = model(ids, labels=labels)
        n = int((labels != IGNORE_INDEX).sum())
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


@dataclass(frozen=True)
class MoefyRow:
    num_experts: int
    top_k: int
    split: str
    router: str
    loss: float
    dense_loss: float

    @property
    def delta(self) -> float:
        return self.loss - self.dense_loss


def moefy_report(
    model: Transformer,
    calibration: Sequence[Tensor],
    evaluation: Sequence[Tensor],
    num_experts: int,
    top_ks: Sequence[int],
    split: str = "cluster",
    router: str = "learned",
    seed: int = 0,
) -> list[MoefyRow]:
    """Loss of the MoEfied model at each k (one split and router, reused across k) next to the dense loss."""
    require_decoder_only(model, "moefy")
    dense_loss = lm_loss(model, evaluation)
    base = moefy(model, calibration, num_experts, max(top_ks), split, router, seed)
    return [
        MoefyRow(num_experts, k, split, router, lm_loss(with_top_k(base, k), evaluation), dense_loss)
        for k in top_ks
    ]
