"""Back-of-the-envelope numbers for a model: parameters, FLOPs, memory, decode speed.

Why a separate architecture record (:class:`Arch`) instead of :class:`ModelConfig`: the calculator
only needs sizes, not modules, and the published models that anchor these estimates are easier to
state (and to vary: ``--set attention=gqa``) as plain sizes. :func:`arch_from_config` turns a
moelab config, MLA (``model.mla``) included, into an ``Arch``; its counts equal ``count_params``
on the built model and its KV bytes per token equal what the model's KV cache holds (tested),
and the presets below reproduce the published total/active counts (tested, table in
docs/inference.md).

Conventions:
- ``total`` counts every weight once (a tied head is the embedding). ``active`` counts what one
  token uses: attention, dense FFNs, top-k routed plus shared experts, routers, norms, the input
  embedding table and the LM head (the convention of Mixtral's, Qwen's and OLMoE's published
  numbers), plus the options imported families carry: linear biases (GPT-2, Qwen2), a learned
  position table (GPT-2), q/k norms (Qwen3, OLMoE) and a shared-expert gate (Qwen2-MoE).
- FLOPs per token: 2 per multiply-accumulate of the active matmul weights (the input embedding
  and a position table are lookups, biases and norms are not multiplied) plus attention's ``QKᵀ`` and ``AV`` over ``context`` keys:
  ``2·layers·heads·(d_qk + d_v)·context``. Training is 3× forward (backward = 2× forward).
- Decode is bandwidth-bound at batch 1: every active weight byte and the whole KV cache are
  read once per token, so tokens/s = bandwidth / bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from moelab.config import ConfigError, ModelConfig

# Bytes per parameter of each storage dtype (int4: two per byte, scales ignored).
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
QK_NORMS = ("none", "head", "full")
ATTENTION = ("gqa", "mla")
GATED = ("swiglu", "geglu_tanh")  # = moelab.moe.experts.GATED (tested): 3 FFN matrices, the others 2
ACTIVATIONS = (*GATED, "gelu", "relu")
# D-wide weight rows per expert a router owns, where it is not one (a gate): hash routing has none,
# noisy top-k a gate and a noise projection. = each registered router's parameters (tested).
ROUTER_MATRICES: dict[str, int] = {"hash": 0, "noisy_topk": 2}


@dataclass(frozen=True)
class Arch:
    """Sizes of a decoder-only transformer with optional MoE and MLA (data only)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int  # hidden size of the dense FFN layers
    activation: str = "swiglu"  # swiglu, geglu_tanh (3 matrices) | gelu, relu (2)
    tie_embeddings: bool = False
    norm_params: int = 1  # parameters per norm per channel: 1 (RMSNorm) or 2 (LayerNorm with bias)
    qk_norm: str = "none"  # none | head (Qwen3: over head_dim) | full (OLMoE: over all heads)
    qkv_bias: bool = False  # biases on q/k/v (Qwen2, GPT-2)
    out_bias: bool = False  # bias on the attention output (GPT-2)
    mlp_bias: bool = False  # biases in the dense FFN layers (GPT-2)
    position_rows: int = 0  # rows of a learned position table (GPT-2: its context length); 0 = RoPE
    dense_hidden: tuple[int, ...] = ()  # hidden size of each dense layer when they differ (dense twins); () = ffn_hidden
    # MoE
    num_experts: int = 0  # 0 = dense model
    top_k: int = 0
    expert_hidden: int = 0
    num_shared_experts: int = 0
    shared_hidden: int = 0  # hidden size of one shared expert
    moe_layers: int = 0  # how many layers are MoE (the others are dense)
    router_bias: bool = False  # a per-expert bias (DeepSeek-V3's aux-loss-free balancing)
    router_matrices: int = 1  # D-wide rows per expert in the router: 1 (a gate), 2 (noisy top-k), 0 (hash)
    shared_gate: bool = False  # one sigmoid gate row per layer on the shared experts (Qwen2-MoE)
    # MLA (DeepSeek-V2/V3); attention="gqa" ignores these
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"calc.{f}={value!r} is invalid: must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"calc.activation={self.activation!r} is invalid: expected one of {ACTIVATIONS}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"calc.qk_norm={self.qk_norm!r} is invalid: expected one of {QK_NORMS}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"calc.attention={self.attention!r} is invalid: expected one of {ATTENTION}")
        if self.num_experts and not (1 <= self.top_k <= self.num_experts):
            raise ConfigError(f"calc.top_k={self.top_k!r} is invalid: must be in [1, num_experts={self.num_experts}]")
        if not 0 <= self.moe_layers <= self.n_layers:
            raise ConfigError(f"calc.moe_layers={self.moe_layers!r} is invalid: must be in [0, n_layers]")
        object.__setattr__(self, "dense_hidden", tuple(self.dense_hidden))
        if self.dense_hidden and len(self.dense_hidden) != self.dense_layers:
            raise ConfigError(
                f"calc.dense_hidden={list(self.dense_hidden)!r} is invalid: needs one size per dense layer "
                f"({self.dense_layers}), or [] for ffn_hidden"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and self.moe_layers > 0

    @property
    def dense_layers(self) -> int:
        return self.n_layers - self.moe_layers if self.is_moe else self.n_layers

    @property
    def mult(self) -> int:
        return 3 if self.activation in GATED else 2

    @property
    def qk_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim


@dataclass(frozen=True)
class Params:
    """Parameter counts by part (see the module docstring for the conventions)."""

    total: int
    active: int
    embedding: int  # input embedding table
    lm_head: int  # 0 when tied
    attention: int  # all layers, norms inside attention included
    dense_ffn: int
    routed_experts: int  # all routed experts of all layers
    routed_active: int  # top_k of them per layer
    shared_experts: int
    router: int
    norms: int
    biases: int = 0  # linear-layer biases: read per token, added, not multiplied
    positions: int = 0  # learned position table (one row read per token)

    @property
    def non_expert(self) -> int:
        """What a hybrid placement keeps on the GPU: everything but the routed experts."""
        return self.total - self.routed_experts

    @property
    def active_without_input_embedding(self) -> int:
        """Active parameters minus the input embedding table (a lookup, not a matmul): the
        convention DeepSeek's published "activated" counts fit (V2: 20.9B vs "21B")."""
        return self.active - self.embedding

    @property
    def dense_equivalent(self) -> float:
        """The seeds' rule of thumb for the dense model an MoE performs like: sqrt(active · total)."""
        return math.sqrt(self.active * self.total)


def attention_params(a: Arch) -> int:
    """Weights of one layer's attention (projections and q/k/latent norms)."""
    D, H = a.d_model, a.n_heads
    if a.attention == "mla":
        q = D * H * a.qk_dim if a.q_lora_rank == 0 else D * a.q_lora_rank + a.q_lora_rank * H * a.qk_dim
        kv_a = D * (a.kv_lora_rank + a.qk_rope_head_dim)
        kv_b = a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv_a + kv_b + H * a.v_head_dim * D + attention_norm_params(a) + attention_bias_params(a)
    qkv = D * (H + 2 * a.n_kv_heads) * a.head_dim
    out = H * a.head_dim * D
    return qkv + out + attention_norm_params(a) + attention_bias_params(a)


def attention_bias_params(a: Arch) -> int:
    """Biases of one layer's attention projections. MLA: ``qkv_bias`` puts biases on its down
    projections (the query latent, the KV latent + RoPE key; moelab.model.mla), ``out_bias`` on
    the output."""
    if a.attention == "mla":
        return int(a.qkv_bias) * (a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim) + int(a.out_bias) * a.d_model
    return int(a.qkv_bias) * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + int(a.out_bias) * a.d_model


def attention_norm_params(a: Arch) -> int:
    """Norm weights inside one layer's attention (MLA latent norms, q/k norms): parameters that
    are read per token but are not matmul weights."""
    if a.attention == "mla":
        return a.kv_lora_rank + a.q_lora_rank
    return {"none": 0, "head": 2 * a.head_dim, "full": (a.n_heads + a.n_kv_heads) * a.head_dim}[a.qk_norm]


def count(a: Arch) -> Params:
    """Total and active parameters of ``a`` by part."""
    L, D = a.n_layers, a.d_model
    attn = L * attention_params(a)
    hidden = a.dense_hidden or (a.ffn_hidden,) * a.dense_layers
    dense_bias = sum((a.mult - 1) * h + D for h in hidden) if a.mlp_bias else 0
    dense = a.mult * D * sum(hidden) + dense_bias
    per_expert = a.mult * D * a.expert_hidden
    routed = a.moe_layers * a.num_experts * per_expert if a.is_moe else 0
    routed_active = a.moe_layers * a.top_k * per_expert if a.is_moe else 0
    shared = a.moe_layers * a.num_shared_experts * a.mult * D * a.shared_hidden if a.is_moe else 0
    shared += a.moe_layers * D if a.is_moe and a.shared_gate and a.num_shared_experts else 0
    router = a.moe_layers * a.num_experts * (a.router_matrices * D + int(a.router_bias)) if a.is_moe else 0
    norms = (2 * L + 1) * D * a.norm_params
    embedding = a.vocab_size * D
    head = 0 if a.tie_embeddings else a.vocab_size * D
    positions = a.position_rows * D
    common = attn + dense + shared + router + norms + embedding + head + positions
    return Params(
        total=common + routed,
        active=common + routed_active,
        embedding=embedding,
        lm_head=head,
        attention=attn,
        dense_ffn=dense,
        routed_experts=routed,
        routed_active=routed_active,
        shared_experts=shared,
        router=router,
        norms=norms,
        biases=L * attention_bias_params(a) + dense_bias,
        positions=positions,
    )


def _read_per_token(a: Arch) -> int:
    """Active weights read per token: the input embedding and a learned position table are one
    row each (ignored), a tied head reads the whole table."""
    p = count(a)
    return p.active - p.embedding - p.positions + (p.embedding if a.tie_embeddings else 0)


def flops_per_token(a: Arch, context: int) -> dict[str, float]:
    """Forward and training FLOPs per token with ``context`` keys attended (attention included)."""
    p = count(a)
    matmul = _read_per_token(a) - p.norms - p.biases - a.n_layers * attention_norm_params(a)
    attn = 2.0 * a.n_layers * a.n_heads * (a.qk_dim + a.v_dim) * context
    forward = 2.0 * matmul + attn
    return {"forward": forward, "forward_attention": attn, "training": 3.0 * forward}


def kv_bytes_per_token(a: Arch, dtype: str = "bf16") -> float:
    """KV-cache bytes one token adds: K and V per KV head (GQA), or the MLA latent + rope key."""
    b = dtype_bytes(dtype)
    if a.attention == "mla":
        return a.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * b
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * b


def dtype_bytes(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype={dtype!r} is invalid: expected one of {', '.join(map(repr, DTYPE_BYTES))}")
    return DTYPE_BYTES[dtype]


def memory(a: Arch, dtype: str = "bf16") -> dict[str, float]:
    """Bytes of weights in every dtype, and of Adam training state for ``dtype`` training.

    Adam keeps two fp32 moments (8 B/param); mixed precision adds fp32 master weights (4 B) and
    gradients in the training dtype.
    """
    p = count(a)
    out = {f"weights_{d}": p.total * b for d, b in DTYPE_BYTES.items()}
    out["gradients"] = p.total * dtype_bytes(dtype)
    out["adam_moments"] = 8.0 * p.total
    out["master_weights"] = 0.0 if dtype == "fp32" else 4.0 * p.total
    out["training_total"] = p.total * dtype_bytes(dtype) + out["gradients"] + out["adam_moments"] + out["master_weights"]
    return out


def decode_tokens_per_s(
    a: Arch, bandwidth_gbs: float, dtype: str = "bf16", context: int = 0, kv_dtype: str = "bf16"
) -> float:
    """Batch-1 decode speed when every active weight and the KV cache are read once per token."""
    weight_bytes = _read_per_token(a) * dtype_bytes(dtype)
    kv = kv_bytes_per_token(a, kv_dtype) * context
    return bandwidth_gbs * 1e9 / (weight_bytes + kv)


def hybrid_tokens_per_s(
    a: Arch,
    gpu_bandwidth_gbs: float,
    cpu_bandwidth_gbs: float,
    dtype: str = "bf16",
    context: int = 0,
    kv_dtype: str = "bf16",
) -> float:
    """Decode speed with attention, shared experts, dense layers and KV cache on the GPU and the
    routed experts in CPU memory, computed where they live (each side reads its own bytes)."""
    p = count(a)
    b = dtype_bytes(dtype)
    gpu_bytes = (_read_per_token(a) - p.routed_active) * b + kv_bytes_per_token(a, kv_dtype) * context
    cpu_bytes = p.routed_active * b
    return 1.0 / (gpu_bytes / (gpu_bandwidth_gbs * 1e9) + cpu_bytes / (cpu_bandwidth_gbs * 1e9))


def split_tokens_per_s(
    a: Arch,
    gpu_bandwidth_gbs: float,
    cpu_bandwidth_gbs: float,
    gpu_memory_gb: float,
    dtype: str = "bf16",
    context: int = 0,
    kv_dtype: str = "bf16",
    bits_per_weight: float | None = None,
) -> dict[str, float]:
    """Batch-1 decode of a model too big for VRAM: what fits on the GPU is read at GPU bandwidth,
    the rest at CPU bandwidth, each side computing on its own weights, one after the other.

    Why: :func:`hybrid_tokens_per_s` assumes the GPU holds exactly the non-routed weights; on a
    consumer card (24 GB) a dense 70B model does not fit and an MoE leaves room for some experts.
    This is llama.cpp's layer split (``-ngl``) for a dense model, and for an MoE its
    "non-expert tensors on the GPU first" placement.

    Placement (bytes are parameters × ``bits_per_weight``/8, or ``dtype``'s bytes):
    - the KV cache at ``context`` sits on the GPU; ``gpu_memory_gb`` minus it is the weight room;
    - the input embedding is a lookup and stays in CPU RAM (not read per token, not placed);
    - the non-routed weights read per token (attention, dense FFNs, shared experts, routers,
      norms, LM head) go first; if they do not all fit, that fraction spills to the CPU;
    - the room left holds a fraction ``f`` of every layer's routed experts; a token's routed
      bytes are read from the GPU in proportion ``f`` (routing is taken as uniform over experts).

    Returns ``tokens_per_s`` and the parts: ``gpu_bytes`` / ``cpu_bytes`` read per token,
    ``gpu_resident_bytes``, ``cpu_resident_bytes`` (weights left in RAM, input embedding included)
    and ``expert_fraction_on_gpu`` (``f``; 0 for a dense model).
    """
    p = count(a)
    b = dtype_bytes(dtype) if bits_per_weight is None else bits_per_weight / 8.0
    kv = kv_bytes_per_token(a, kv_dtype) * context
    room = max(0.0, gpu_memory_gb * 1e9 - kv)
    shared = (_read_per_token(a) - p.routed_active) * b  # non-routed bytes, all read per token
    gpu_shared = min(shared, room)
    routed_stored = p.routed_experts * b
    f = min(1.0, (room - gpu_shared) / routed_stored) if routed_stored else 0.0
    gpu_bytes = gpu_shared + f * p.routed_active * b + kv
    cpu_bytes = (shared - gpu_shared) + (1.0 - f) * p.routed_active * b
    seconds = gpu_bytes / (gpu_bandwidth_gbs * 1e9) + cpu_bytes / (cpu_bandwidth_gbs * 1e9)
    gpu_resident = gpu_shared + f * routed_stored
    return {
        "tokens_per_s": 1.0 / seconds,
        "gpu_bytes": gpu_bytes,
        "cpu_bytes": cpu_bytes,
        "gpu_resident_bytes": gpu_resident,
        "cpu_resident_bytes": p.total * b - gpu_resident,
        "expert_fraction_on_gpu": f,
    }


def arch_from_config(cfg: ModelConfig, name: str = "config") -> Arch:
    """The calculator's view of a moelab model config: its counts equal ``count_params`` on the
    built :class:`~moelab.model.transformer.Transformer` (tested over many configs), so a size can
    be known without allocating the model."""
    moe, mla = cfg.moe, cfg.mla
    dense_hidden: tuple[int, ...] = ()  # the usual case: every dense layer has ffn_hidden
    if cfg.layer_ffn_hidden and any(h != cfg.ffn_hidden for h in cfg.layer_ffn_hidden):
        dense_hidden = tuple(h for i, h in enumerate(cfg.layer_ffn_hidden) if not cfg.is_moe_layer(i))
    return Arch(
        name=name,
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
        head_dim=cfg.head_dim,
        ffn_hidden=cfg.ffn_hidden,
        dense_hidden=dense_hidden,
        activation=cfg.activation,
        tie_embeddings=cfg.tie_embeddings,
        norm_params=1 if cfg.norm == "rmsnorm" else 2,
        qk_norm={"none": "none", "head": "head", "proj": "full"}[cfg.qk_norm],
        qkv_bias=cfg.qkv_bias,
        out_bias=cfg.out_bias,
        mlp_bias=cfg.mlp_bias,
        position_rows=cfg.max_seq_len if cfg.positions == "learned" else 0,
        shared_gate=bool(moe and moe.shared_gate),
        num_experts=moe.num_experts if moe else 0,
        router_matrices=ROUTER_MATRICES.get(moe.router.name, 1) if moe else 1,
        top_k=moe.top_k if moe else 0,
        expert_hidden=moe.expert_hidden if moe else 0,
        num_shared_experts=moe.num_shared_experts if moe else 0,
        shared_hidden=moe.shared_expert_hidden if moe else 0,
        moe_layers=len(cfg.moe_layers),
        attention="mla" if mla else "gqa",
        q_lora_rank=(mla.q_lora_rank or 0) if mla else 0,
        kv_lora_rank=mla.kv_lora_rank if mla else 0,
        qk_nope_head_dim=mla.qk_nope_head_dim if mla else 0,
        qk_rope_head_dim=mla.qk_rope_head_dim if mla else 0,
        v_head_dim=mla.v_head_dim if mla else 0,
    )


# ----------------------------------------------------------------------------- published models

PRESETS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("mixtral-8x7b", 32000, 4096, 32, 32, 8, 128, 14336,
             num_experts=8, top_k=2, expert_hidden=14336, moe_layers=32),
        Arch("qwen3-235b-a22b", 151936, 4096, 94, 64, 4, 128, 12288, qk_norm="head",
             num_experts=128, top_k=8, expert_hidden=1536, moe_layers=94),
        Arch("deepseek-v3", 129280, 7168, 61, 128, 128, 128, 18432,
             num_experts=256, top_k=8, expert_hidden=2048, num_shared_experts=1, shared_hidden=2048,
             moe_layers=58, router_bias=True, attention="mla", q_lora_rank=1536, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        Arch("olmoe-1b-7b", 50304, 2048, 16, 16, 16, 128, 1024, qk_norm="full",
             num_experts=64, top_k=8, expert_hidden=1024, moe_layers=16),
        Arch("llama-3-70b", 128256, 8192, 80, 64, 8, 128, 28672),
    )
}

@dataclass(frozen=True)
class Published:
    """A parameter count as the model's authors state it, and which of our counts it is."""

    total: float
    active: float
    source: str
    active_field: str = "active"  # the Params attribute the published active count corresponds to

    def matches(self, ours: float, published: float, rel: float = 0.01) -> bool:
        """Within ``rel`` of the published figure, or equal to it at its stated precision
        (published counts have 2-3 significant digits: "1.3B" is any count in [1.25B, 1.35B))."""
        if abs(ours - published) <= rel * published:
            return True
        digits = len(f"{published:.6g}".replace(".", "").replace("e+", "e").split("e")[0].rstrip("0"))
        return float(f"{ours:.{max(digits, 1)}g}") == float(f"{published:.{max(digits, 1)}g}")


PUBLISHED: dict[str, Published] = {
    "mixtral-8x7b": Published(46.7e9, 12.9e9, "Mistral AI, 'Mixtral of experts' announcement (Dec 2023)"),
    "qwen3-235b-a22b": Published(235e9, 22e9, "Qwen3 technical report (2025), model table"),
    "deepseek-v3": Published(
        671e9, 37e9, "DeepSeek-V3 technical report (2024); MTP module excluded", "active_without_input_embedding"
    ),
    "olmoe-1b-7b": Published(6.9e9, 1.3e9, "OLMoE paper (Muennighoff et al. 2024), Table 1"),
    "llama-3-70b": Published(70.6e9, 70.6e9, "Meta Llama 3 (70.6B in the Hugging Face model listing)"),
}


def resolve(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Arch:
    """A calc preset, a moelab model preset (smoke/tiny/small), or a model config file, with
    ``--set KEY=VALUE`` overrides: moelab config keys for the latter two, :class:`Arch` fields
    for a calc preset (``--set attention=gqa --set n_kv_heads=8``)."""
    from pathlib import Path

    from moelab.config import apply_overrides, load_config, preset, preset_names

    key = name_or_path.lower()
    if key in PRESETS:
        if not overrides:
            return PRESETS[key]
        # a variant of a published model (e.g. attention=gqa n_kv_heads=8): Arch field names,
        # renamed so that the published counts are not shown against it
        variant = apply_overrides(PRESETS[key], overrides)
        return replace(variant, name=f"{key} ({', '.join(overrides)})")
    if name_or_path in preset_names():
        return arch_from_config(apply_overrides(preset(name_or_path), overrides), name_or_path)
    if Path(name_or_path).is_file():
        cfg = apply_overrides(load_config(name_or_path), overrides)
        return arch_from_config(cfg, Path(name_or_path).stem)
    allowed = ", ".join([*sorted(PRESETS), *preset_names()])
    raise ConfigError(f"calc target {name_or_path!r} is neither a config file nor a preset: expected one of {allowed}")


def report(
    a: Arch,
    dtype: str = "bf16",
    context: int = 4096,
    gpu_bandwidth_gbs: float = 3350.0,
    cpu_bandwidth_gbs: float = 100.0,
    kv_dtype: str = "bf16",
) -> dict[str, object]:
    """Everything ``moelab calc`` prints, as plain data."""
    p = count(a)
    out: dict[str, object] = {"arch": asdict(a), "params": asdict(p)}
    out["params"]["dense_equivalent"] = p.dense_equivalent  # type: ignore[index]
    out["params"]["active_without_input_embedding"] = p.active_without_input_embedding  # type: ignore[index]
    out["flops_per_token"] = flops_per_token(a, context)
    out["memory_bytes"] = memory(a, dtype)
    out["kv_cache_bytes_per_token"] = kv_bytes_per_token(a, kv_dtype)
    out["kv_cache_bytes_at_context"] = kv_bytes_per_token(a, kv_dtype) * context
    out["decode_tokens_per_s"] = {
        "gpu": decode_tokens_per_s(a, gpu_bandwidth_gbs, dtype, context, kv_dtype),
        "cpu": decode_tokens_per_s(a, cpu_bandwidth_gbs, dtype, context, kv_dtype),
        "hybrid": hybrid_tokens_per_s(a, gpu_bandwidth_gbs, cpu_bandwidth_gbs, dtype, context, kv_dtype)
        if a.is_moe
        else None,
    }
    out["settings"] = {
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "context": context,
        "gpu_bandwidth_gbs": gpu_bandwidth_gbs,
        "cpu_bandwidth_gbs": cpu_bandwidth_gbs,
    }
    if a.name in PUBLISHED:
        pub = PUBLISHED[a.name]
        out["published"] = asdict(pub)
    return out


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def format_report(data: dict) -> str:
    """``report()`` as the text ``moelab calc`` prints."""
    p, s, a = data["params"], data["settings"], data["arch"]
    lines = [f"{a['name']}: {a['n_layers']} layers, d_model {a['d_model']}, vocab {a['vocab_size']}"
             + (f", {a['moe_layers']} MoE layers of {a['num_experts']} experts (top-{a['top_k']})" if a["moe_layers"] else "")]
    lines.append(f"parameters      total {_si(p['total'])} ({p['total']:,})   active/token {_si(p['active'])} "
                 f"({p['active']:,})   dense-equivalent sqrt(active·total) {_si(p['dense_equivalent'])}")
    lines.append(f"                routed experts {_si(p['routed_experts'])}   everything else {_si(p['total'] - p['routed_experts'])}"
                 f"   active without input embedding {_si(p['active_without_input_embedding'])}")
    if "published" in data:
        pub = data["published"]
        lines.append(f"published       total {_si(pub['total'])}   active {_si(pub['active'])}   ({pub['source']})")
    f = data["flops_per_token"]
    lines.append(f"FLOPs/token     forward {_si(f['forward'], 'FLOP')} (attention {_si(f['forward_attention'], 'FLOP')} "
                 f"at context {s['context']})   training {_si(f['training'], 'FLOP')}")
    m = data["memory_bytes"]
    lines.append("weights         " + "   ".join(f"{d} {_si(m['weights_' + d], 'B')}" for d in DTYPE_BYTES))
    lines.append(f"training state  {s['dtype']} weights+grads, Adam moments, fp32 master: {_si(m['training_total'], 'B')}")
    lines.append(f"KV cache        {_si(data['kv_cache_bytes_per_token'], 'B')}/token ({s['kv_dtype']}), "
                 f"{_si(data['kv_cache_bytes_at_context'], 'B')} at context {s['context']}")
    t = data["decode_tokens_per_s"]
    hybrid = f"   hybrid (experts on CPU) {t['hybrid']:.3g}" if t["hybrid"] is not None else ""
    lines.append(f"decode tok/s    batch 1, {s['dtype']} weights: GPU {s['gpu_bandwidth_gbs']:g} GB/s {t['gpu']:.3g}   "
                 f"CPU {s['cpu_bandwidth_gbs']:g} GB/s {t['cpu']:.3g}{hybrid}")
    return "\n".join(lines)


__all__ = [
    "DTYPE_BYTES",
    "PRESETS",
    "PUBLISHED",
    "Arch",
    "Params",
    "Published",
    "arch_from_config",
    "attention_norm_params",
    "attention_params",
    "count",
    "decode_tokens_per_s",
    "flops_per_token",
    "format_report",
    "hybrid_tokens_per_s",
    "kv_bytes_per_token",
    "memory",
    "replace",
    "report",
    "resolve",
    "split_tokens_per_s",
]
