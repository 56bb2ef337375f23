"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes an MoE one.

Every chosen dense FFN is copied into the experts of an MoE layer; everything else (embeddings,
attention, norms, the other FFNs) is copied unchanged. Options:

- **placement**: which layers become MoE (``MoEConfig.placement``: all, every_n, first_k_dense,
  explicit); the others stay dense.
- **granularity g** (fine-grained upcycling, as in DeepSeekMoE / Qwen-MoE "upcycled" models): the
  FFN's F hidden neurons are split into g contiguous slices of F/g; expert e is slice ``e mod g``
  (E must be a multiple of g). Each slice's down-projection is multiplied by g, so that when all
  g slices are chosen with weight 1/g the sum is the dense FFN again.
- **noise**: additive Gaussian noise of ``noise_std × std(W)`` on each expert's weights, which
  breaks the symmetry between copies (otherwise identical experts get identical gradients
  except through routing).
- **router_init**: ``zeros`` (uniform scores: the model starts as exactly the dense one) or
  ``normal`` (N(0, init_std); with g = 1 and renormalised top-k the model is *still* exactly the
  dense one, because any convex combination of identical experts is that expert).

Why it is exact: with identical experts f and renormalised top-k, y = Σ_k w_k f(x) = f(x) since
Σ_k w_k = 1. With g slices, k = g and a uniform router each chosen weight is 1/g, and the
slices cover each neuron once: y = Σ_s (1/g) · g · f_s(x) = f(x).

Legend: E experts, g slices, F dense hidden, f = F/g expert hidden, D model dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from moelab.config import ConfigError, ModelConfig, MoEConfig
from moelab.errors import UserError
from moelab.model.guards import require_decoder_only
from moelab.model.transformer import Transformer
from moelab.nn.activations import up_multiplier

ROUTER_INITS = ("zeros", "normal")


def slice_ffn(w_up_MD: Tensor, w_down_DF: Tensor, activation: str, g: int) -> list[tuple[Tensor, Tensor]]:
    """Split one FFN into g neuron slices: ``[(w_up [m·F/g, D], w_down [D, F/g])]``.

    SwiGLU's ``w_up`` is gate rows then up rows; a slice takes the same neurons from both halves.
    """
    F = w_down_DF.shape[1]
    f = F // g
    parts = w_up_MD.chunk(2, 0) if up_multiplier(activation) == 2 else (w_up_MD,)
    out = []
    for s in range(g):
        rows = slice(s * f, (s + 1) * f)
        out.append((torch.cat([p[rows] for p in parts], 0), w_down_DF[:, rows]))
    return out


def upcycled_config(cfg: ModelConfig, moe: MoEConfig, granularity: int = 1) -> ModelConfig:
    """The MoE config of an upcycled dense model: ``moe`` with ``expert_hidden`` set to F/g."""
    if cfg.moe is not None:
        raise UserError("upcycling needs a dense model: this one already has model.moe")
    if cfg.mlp_bias:
        raise ConfigError("model.mlp_bias=True cannot be upcycled: experts have no biases")
    if cfg.gelu_approx != "none":
        raise ConfigError(f"model.gelu_approx={cfg.gelu_approx!r} cannot be upcycled: experts use exact GELU")
    g = granularity
    layers = [i for i in range(cfg.n_layers) if moe.is_moe_layer(i, cfg.n_layers)]
    hidden = {cfg.ffn_hidden_at(i) for i in layers}
    if len(hidden) != 1:
        raise ConfigError(
            f"model.layer_ffn_hidden={list(cfg.layer_ffn_hidden)!r}: upcycled layers need one FFN size"
        )
    F = hidden.pop()
    if g < 1 or F % g:
        raise ConfigError(f"granularity={g!r} is invalid: it must divide the FFN hidden size {F}")
    if moe.num_experts % g:
        raise ConfigError(
            f"moe.num_experts={moe.num_experts!r} is invalid: must be a multiple of granularity={g}"
        )
    return replace(cfg, moe=replace(moe, expert_hidden=F // g))


@torch.no_grad()
def upcycle(
    model: Transformer,
    moe: MoEConfig,
    granularity: int = 1,
    noise_std: float = 0.0,
    router_init: str = "zeros",
    seed: int = 0,
) -> Transformer:
    """A new MoE :class:`Transformer` whose experts are (slices of) ``model``'s FFNs."""
    require_decoder_only(model, "upcycle")
    if router_init not in ROUTER_INITS:
        raise ConfigError(
            f"router_init={router_init!r} is invalid: expected one of {', '.join(ROUTER_INITS)}"
        )
    if noise_std < 0:
        raise ConfigError(f"noise_std={noise_std!r} is invalid: must be >= 0")
    cfg = upcycled_config(model.cfg, moe, granularity)
    new = Transformer(cfg)
    old_state = model.state_dict()
    new_state = new.state_dict()
    for k, v in new_state.items():
        if k in old_state and old_state[k].shape == v.shape:
            v.copy_(old_state[k])
    gen = torch.Generator().manual_seed(seed)
    g = granularity
    for i in cfg.moe_layers:
        dense = model.blocks[i].ffn
        layer = new.blocks[i].ffn
        slices = slice_ffn(dense.w_up.weight, dense.w_down.weight, cfg.activation, g)
        for e in range(cfg.moe.num_experts):  # type: ignore[union-attr]
            up, down = slices[e % g]
            layer.experts.w_up[e].copy_(up)
            layer.experts.w_down[e].copy_(down * g)
            if noise_std > 0:
                for w in (layer.experts.w_up[e], layer.experts.w_down[e]):
                    w.add_(torch.randn(w.shape, generator=gen).to(w) * noise_std * w.std())
        gate = layer.router.gate.weight
        if router_init == "zeros":
            gate.zero_()
        else:
            gate.copy_(torch.randn(gate.shape, generator=gen) * cfg.init_std)
        if hasattr(layer.router, "bias") and isinstance(layer.router.bias, Tensor):
            layer.router.bias.zero_()
    return new.train(model.training)
