"""Configuration: one tree of frozen dataclasses, validated on construction.

Why frozen dataclasses: a config is data that names an experiment. It must be hashable in
spirit (no hidden mutation after a model was built from it), printable, and round-trip through
YAML/JSON exactly. Every check lives in ``__post_init__`` and raises :class:`ConfigError`
naming the field, the bad value and what is allowed, so a user never meets a shape error deep
inside a forward pass.

Generic helpers at the bottom (:func:`from_dict`, :func:`to_dict`, :func:`apply_overrides`,
:func:`load_config`, :func:`save_config`) work on any dataclass in this tree, so adding a field
is one line.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from moelab.errors import ConfigError

IGNORE_INDEX = -100  # the label of a position no loss scores (PyTorch's cross_entropy default), everywhere


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


def _require(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(path, value, allowed)


def check_field(ok: bool, path: str, value: Any, allowed: str) -> None:
    """ConfigError ``path=value is invalid: allowed`` unless ``ok``: the house's wording for config
    checks outside this module (router options, registry names)."""
    _require(ok, path, value, allowed)


def check_one_of(path: str, value: Any, allowed: Iterable[str]) -> None:
    """ConfigError naming ``path`` and the allowed values unless ``value`` is one of them."""
    _one_of(path, value, allowed)


def _one_of(path: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = sorted(allowed)
    _require(value in allowed, path, value, f"expected one of {', '.join(map(repr, allowed))}")


ACTIVATIONS = ("swiglu", "gelu", "relu", "geglu_tanh")  # relu: T5 v1.0/Switch; geglu_tanh: T5 v1.1
GELU_APPROXIMATIONS = ("none", "tanh")  # tanh: GPT-2's gelu_new (dense FFNs only)
POSITIONS = ("rope", "learned")  # rotary (Llama family) or learned absolute embeddings (GPT-2)
QK_NORMS = ("none", "head", "proj")  # RMSNorm on q/k: per head (Qwen3) or over the whole projection (OLMoE)
NORMS = ("rmsnorm", "layernorm")
ATTENTION_KINDS = ("causal", "prefix", "bidirectional")
PLACEMENTS = ("all", "every_n", "first_k_dense", "explicit")
CAPACITY_SCOPES = ("batch", "sequence")  # where expert capacity is counted (moelab.moe.capacity)


OptionValue = bool | int | float | str | None


@dataclass(frozen=True, init=False)
class RouterConfig:
    """Which router sends tokens to experts (``name``, in the router registry: ``moelab routers``) and
    its own options, as given: ``RouterConfig(name="sigmoid_bias", n_group=8, topk_group=4)``.

    The options belong to the router: each router class declares them, with their defaults and checks,
    in its ``Options`` dataclass (:mod:`moelab.moe.routers`), which reads them when the model is built
    or a run is assembled (:func:`moelab.moe.validate.check_moe_config`). Here they are data only: a
    name → scalar mapping (YAML: the keys beside ``name`` under ``moe.router``), so this layer knows no
    router. ``options`` is a sorted tuple of pairs (frozen and hashable); :meth:`option` reads one.
    """

    name: str
    options: tuple[tuple[str, OptionValue], ...]
    OPEN: ClassVar[bool] = True  # YAML and --set take any key beside ``name`` (an option of the router)

    def __init__(
        self, name: str = "topk", options: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), **more: Any
    ) -> None:
        merged = {**dict(options), **more}
        for key, value in merged.items():
            _require(
                isinstance(key, str) and key.isidentifier() and key not in ("name", "options"),
                "moe.router", key, "option names are identifiers other than 'name' and 'options'",
            )
            _require(
                value is None or isinstance(value, (bool, int, float, str)),
                f"moe.router.{key}", value, "a router option is a number, a string, true/false or null",
            )
        _require(isinstance(name, str) and bool(name), "moe.router.name", name, "must be a router's name")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(merged.items())))

    def option(self, key: str, default: Any = None) -> Any:
        """The value given for ``key``, else ``default`` (the router's ``Options`` holds the real defaults)."""
        return dict(self.options).get(key, default)

    def with_options(self, **more: Any) -> RouterConfig:
        """A copy with ``more`` options set (or replaced)."""
        return RouterConfig(self.name, {**dict(self.options), **more})

    def to_data(self) -> dict[str, Any]:
        """The YAML shape: ``{name: ..., option: value, ...}``."""
        return {"name": self.name, **dict(self.options)}

    @classmethod
    def from_data(cls, data: Mapping[str, Any], path: str = "moe.router") -> RouterConfig:
        if not isinstance(data, Mapping):
            _fail(path, data, "expected a mapping: {name: ROUTER, option: value, ...}")
        rest = {k: v for k, v in data.items() if k != "name"}
        if "options" in rest and isinstance(rest["options"], Mapping):  # RouterConfig(options=...) written out
            rest = {**rest.pop("options"), **rest}
        return cls(data.get("name", "topk"), rest)


# Losses beside aux_loss, by registry name; MoEConfig holds each one's weight as ``<name>_coef``.
_EXTRA_LOSSES = ("seq_aux", "importance", "load")


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts feed-forward block, and where it replaces the dense FFN.

    Fine-grained experts (DeepSeekMoE) are simply a small ``expert_hidden`` with larger
    ``num_experts`` and ``top_k``; shared experts are always-on dense experts beside them.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    num_shared_experts: int = 0
    shared_hidden: int | None = None  # hidden size of each shared expert; None = expert_hidden
    shared_gate: bool = False  # shared experts scaled by sigmoid(x·w) per token (Qwen2-MoE)
    router: RouterConfig = field(default_factory=RouterConfig)
    aux_loss: str = "load_balance"  # balance loss, by name in the loss registry
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "position"  # which assignments an over-full expert drops
    capacity_scope: str = "batch"  # capacity counted over the flattened batch, or per sequence (Switch/HF groups)
    expert_capacity: int | None = None  # fixed assignments per expert and scope, instead of capacity_factor (HF Switch)
    placement: str = "all"  # all | every_n | first_k_dense | explicit
    every_n: int = 2  # placement=every_n: layers n-1, 2n-1, ... are MoE
    first_k_dense: int = 1  # placement=first_k_dense: the first k layers stay dense
    layers: tuple[int, ...] = ()  # placement=explicit: these layer indices are MoE
    dispatch: str = "auto"  # dispatch backend, by name in the dispatch registry (auto: fastest measured)
    # Extra router losses beside aux_loss (0 = off), each by name in the loss registry:
    seq_aux_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss ("seq_aux"), small alpha e.g. 1e-4
    importance_coef: float = 0.0  # Shazeer et al. importance CV^2 loss ("importance")
    load_coef: float = 0.0  # Shazeer et al. smooth load CV^2 loss ("load", noisy_topk only)
    # Router health (moelab.moe.health.RouterHealth):
    health_collapse_share: float = 0.9  # collapse = one expert chosen by more than this share of tokens ...
    health_collapse_steps: int = 50  # ... for this many consecutive observed steps
    health_dead_steps: int = 100  # an expert is dead after this many observed steps without tokens

    def __post_init__(self) -> None:
        # Names of routers, losses, drop policies and dispatch backends, and each router's options, are
        # checked against their registries by moelab.moe.validate.check_moe_config (config knows no registry).
        object.__setattr__(self, "layers", tuple(self.layers))
        _require(self.num_experts >= 1, "moe.num_experts", self.num_experts, "must be >= 1")
        _require(
            1 <= self.top_k <= self.num_experts,
            "moe.top_k",
            self.top_k,
            f"must be between 1 and moe.num_experts={self.num_experts}",
        )
        _require(self.expert_hidden >= 1, "moe.expert_hidden", self.expert_hidden, "must be >= 1")
        _require(self.num_shared_experts >= 0, "moe.num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.shared_hidden is not None:
            _require(self.shared_hidden >= 1, "moe.shared_hidden", self.shared_hidden, "must be >= 1 or null")
        if self.shared_gate:
            _require(
                self.num_shared_experts > 0, "moe.shared_gate", self.shared_gate, "needs moe.num_shared_experts >= 1"
            )
        _require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        _require(self.z_loss_coef >= 0, "moe.z_loss_coef", self.z_loss_coef, "must be >= 0")
        if self.capacity_factor is not None:
            _require(
                math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
                "moe.capacity_factor",
                self.capacity_factor,
                "must be > 0, or null for dropless routing",
            )
        _one_of("moe.capacity_scope", self.capacity_scope, CAPACITY_SCOPES)
        if self.expert_capacity is not None:
            _require(
                isinstance(self.expert_capacity, int) and self.expert_capacity >= 1,
                "moe.expert_capacity",
                self.expert_capacity,
                "must be a positive integer, or null to derive it from moe.capacity_factor",
            )
            _require(
                self.capacity_factor is None,
                "moe.expert_capacity",
                self.expert_capacity,
                f"set either it or moe.capacity_factor (={self.capacity_factor}), not both",
            )
        _one_of("moe.placement", self.placement, PLACEMENTS)
        _require(self.every_n >= 1, "moe.every_n", self.every_n, "must be >= 1")
        _require(self.first_k_dense >= 0, "moe.first_k_dense", self.first_k_dense, "must be >= 0")
        if self.placement == "explicit":
            _require(len(self.layers) > 0, "moe.layers", self.layers, "placement=explicit needs a non-empty list")
        for name in _EXTRA_LOSSES:
            coef = getattr(self, f"{name}_coef")
            _require(coef >= 0, f"moe.{name}_coef", coef, "must be >= 0")
            _require(
                coef == 0 or self.aux_loss != name,
                f"moe.{name}_coef",
                coef,
                f"moe.aux_loss is already {name!r}: set its weight with moe.aux_loss_coef, or pick another aux_loss",
            )
        _require(
            0 < self.health_collapse_share <= 1,
            "moe.health_collapse_share",
            self.health_collapse_share,
            "must be in (0, 1]",
        )
        _require(self.health_collapse_steps >= 1, "moe.health_collapse_steps", self.health_collapse_steps, "must be >= 1")
        _require(self.health_dead_steps >= 1, "moe.health_dead_steps", self.health_dead_steps, "must be >= 1")

    def loss_coefs(self) -> dict[str, float]:
        """Each router loss the MoE layer reports, by registry name, with its coefficient.

        ``aux_loss`` and ``z_loss`` are always reported (possibly with weight 0, so they are
        logged); the extra losses only when their coefficient is positive.
        """
        coefs = {self.aux_loss: self.aux_loss_coef, "z_loss": self.z_loss_coef}
        for name in _EXTRA_LOSSES:
            coef = getattr(self, f"{name}_coef")
            if coef > 0:
                coefs[name] = coef
        return coefs

    @property
    def shared_expert_hidden(self) -> int:
        return self.expert_hidden if self.shared_hidden is None else self.shared_hidden

    def is_moe_layer(self, layer: int, n_layers: int) -> bool:
        """Whether layer ``layer`` (0-based) of ``n_layers`` uses this MoE block."""
        if self.placement == "all":
            return True
        if self.placement == "every_n":
            return (layer + 1) % self.every_n == 0
        if self.placement == "first_k_dense":
            return layer >= self.first_k_dense
        return layer in self.layers


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values from one low-rank latent.

    Each token is compressed to a ``kv_lora_rank`` latent (normalised) plus one shared
    ``qk_rope_head_dim`` RoPE key; per-head keys (``qk_nope_head_dim``) and values
    (``v_head_dim``) are expanded from the latent. Queries optionally go through their own
    ``q_lora_rank`` bottleneck (None = a full projection). The KV cache stores only the latent
    and the RoPE key: ``kv_lora_rank + qk_rope_head_dim`` numbers per token and layer, against
    ``2 · n_kv_heads · head_dim`` for GQA.
    """

    kv_lora_rank: int = 64
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    latent_norm_eps: float = 1e-6  # eps of the RMSNorms on the latents (DeepSeek fixes it at 1e-6)

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.mla.{name}", value, "must be a positive integer")
        if self.q_lora_rank is not None:
            _require(self.q_lora_rank >= 1, "model.mla.q_lora_rank", self.q_lora_rank, "must be >= 1 or null")
        _require(self.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim", self.qk_rope_head_dim, "must be even (RoPE)")
        _require(self.latent_norm_eps > 0, "model.mla.latent_norm_eps", self.latent_norm_eps, "must be > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """The transformer: one block design, dense or MoE per layer."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention); fewer = GQA
    ffn_hidden: int = 512  # hidden size of dense FFN layers
    layer_ffn_hidden: tuple[int, ...] = ()  # per-layer dense hidden sizes (dense twins of partial MoE); () = ffn_hidden
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    attention: str = "causal"  # causal (GPT) | prefix (prefix-LM) | bidirectional (encoder)
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    moe: MoEConfig | None = None  # None = a dense model
    # Options the Hugging Face families need (defaults = the Foundation model).
    attn_head_dim: int | None = None  # per-head size when it is not d_model / n_heads (Qwen3); None = derived
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, GPT-2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in dense FFNs (GPT-2)
    qk_norm: str = "none"  # none | head (Qwen3) | proj (OLMoE)
    positions: str = "rope"  # rope | learned (GPT-2: max_seq_len learned position embeddings)
    mla: MLAConfig | None = None  # multi-head latent attention instead of GQA (DeepSeek-V2/V3)
    gelu_approx: str = "none"  # activation=gelu: none (erf) | tanh (GPT-2's gelu_new; dense FFNs only)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}", value, "must be a positive integer")
        if self.attn_head_dim is None and self.mla is None:
            _require(
                self.d_model % self.n_heads == 0,
                "model.d_model",
                self.d_model,
                f"must be divisible by model.n_heads={self.n_heads} (or set model.attn_head_dim)",
            )
        elif self.attn_head_dim is not None:
            _require(self.attn_head_dim >= 1, "model.attn_head_dim", self.attn_head_dim, "must be >= 1 or null")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        if self.positions == "rope" and self.mla is None:
            _require(self.head_dim % 2 == 0, "model.d_model", self.d_model, "the head dim must be even (RoPE)")
        _one_of("model.activation", self.activation, ACTIVATIONS)
        _one_of("model.positions", self.positions, POSITIONS)
        _one_of("model.qk_norm", self.qk_norm, QK_NORMS)
        if self.mla is not None:
            _require(self.qk_norm == "none", "model.qk_norm", self.qk_norm, "must be 'none' with model.mla")
            _require(self.positions == "rope", "model.positions", self.positions, "must be 'rope' with model.mla")
        _one_of("model.gelu_approx", self.gelu_approx, GELU_APPROXIMATIONS)
        if self.moe is not None:
            _require(self.gelu_approx == "none", "model.gelu_approx", self.gelu_approx, "MoE experts need 'none'")
        _one_of("model.norm", self.norm, NORMS)
        _one_of("model.attention", self.attention, ATTENTION_KINDS)
        _require(self.rope_theta > 0, "model.rope_theta", self.rope_theta, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _require(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        _require(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        object.__setattr__(self, "layer_ffn_hidden", tuple(self.layer_ffn_hidden))
        if self.layer_ffn_hidden:
            _require(
                len(self.layer_ffn_hidden) == self.n_layers and min(self.layer_ffn_hidden) >= 1,
                "model.layer_ffn_hidden",
                list(self.layer_ffn_hidden),
                f"needs one positive hidden size per layer (model.n_layers={self.n_layers}), or [] for ffn_hidden",
            )
        if self.moe is not None and self.moe.placement == "explicit":
            bad = [i for i in self.moe.layers if not 0 <= i < self.n_layers]
            _require(
                not bad,
                "moe.layers",
                list(self.moe.layers),
                f"layer indices must be in [0, {self.n_layers - 1}] (model.n_layers={self.n_layers}); bad: {bad}",
            )

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: the head dim, or MLA's decoupled RoPE part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    def ffn_hidden_at(self, layer: int) -> int:
        """Hidden size of the dense FFN of ``layer``."""
        return self.layer_ffn_hidden[layer] if self.layer_ffn_hidden else self.ffn_hidden

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer, self.n_layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


# ----------------------------------------------------------------------------- presets

_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop CPU: for tests and `--preset smoke` runs.
    "smoke": dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=128,
        moe=dict(num_experts=4, top_k=2, expert_hidden=64),
    ),
    # The default of `moelab compare`: minutes on 2 CPU cores.
    "tiny": dict(
        vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512, max_seq_len=256,
        moe=dict(num_experts=8, top_k=2, expert_hidden=256),
    ),
    # A model worth a GPU hour.
    "small": dict(
        vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=2048, max_seq_len=1024,
        moe=dict(num_experts=16, top_k=2, expert_hidden=1024),
    ),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str) -> ModelConfig:
    """A named model configuration (``smoke``, ``tiny``, ``small``)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(map(repr, preset_names()))}")
    return from_dict(ModelConfig, _PRESETS[name])


# ----------------------------------------------------------------------------- data, training, runs

OBJECTIVE_NAMES = ("causal", "prefix", "mlm", "span")  # = moelab.objectives.OBJECTIVES (tested)
PRECISIONS = ("fp32", "bf16", "bf16-master", "auto")  # bf16-master: moelab.train.master_weights
TOKENIZERS = ("bpe", "bytes")


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes token blocks (see ``moelab.data``).

    ``corpus`` is a registered name (``builtin``, ``synthetic``), a path (a text file, a folder,
    ``.jsonl``/``.jsonl.gz``, a ``save_to_disk`` folder) or ``hf:NAME[:CONFIG]``; ``text_field`` is the
    JSONL field / HF column that holds the text. ``tokenizer`` is ``bpe`` (byte-level BPE
    trained on the training split with ``model.vocab_size`` entries), ``bytes`` (256 bytes + 3
    specials) or a path to a ``tokenizer.json``. The model's vocab size is set to the
    tokenizer's when a run starts.
    """

    corpus: str = "builtin"
    tokenizer: str = "bpe"
    seq_len: int = 128
    val_fraction: float = 0.05
    max_bytes_per_domain: int = 2_000_000  # cap per domain label: bounds corpus build and tokenising time
    synthetic_docs: int = 400  # documents per synthetic domain (builtin and synthetic corpora)
    tokenizer_train_bytes: int = 4_000_000  # text used to train the BPE tokenizer
    seed: int = 0
    train_fraction: float = 1.0  # train on this fraction of the training blocks, evenly spaced (repeated-data studies)
    text_field: str = "text"  # JSONL field / HF dataset column read as text (other fields become labels)

    def __post_init__(self) -> None:
        _require(isinstance(self.corpus, str) and bool(self.corpus), "data.corpus", self.corpus, "must be a name or path")
        _require(
            isinstance(self.text_field, str) and bool(self.text_field.strip()),
            "data.text_field", self.text_field, "must name the JSONL field / dataset column that holds the text",
        )
        _require(bool(self.tokenizer), "data.tokenizer", self.tokenizer, "bpe, bytes or a tokenizer.json path")
        _require(self.seq_len >= 2, "data.seq_len", self.seq_len, "must be >= 2")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _require(self.max_bytes_per_domain >= 1, "data.max_bytes_per_domain", self.max_bytes_per_domain, "must be >= 1")
        _require(self.synthetic_docs >= 1, "data.synthetic_docs", self.synthetic_docs, "must be >= 1")
        _require(
            self.tokenizer_train_bytes >= 1, "data.tokenizer_train_bytes", self.tokenizer_train_bytes, "must be >= 1"
        )
        _require(0.0 < self.train_fraction <= 1.0, "data.train_fraction", self.train_fraction, "must be in (0, 1]")


SCHEDULE_NAMES = ("cosine", "wsd")  # = moelab.train.schedule.SCHEDULES (tested)
DECAY_SHAPES = ("linear", "sqrt", "cosine")  # = moelab.train.schedule.DECAY_SHAPES (tested)


LORA_TARGETS = ("attention", "mlp", "experts")  # = moelab.model.lora's weight groups (tested)
LORA_BASE_DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA fine-tuning (:mod:`moelab.model.lora`): low-rank updates ``(alpha / rank) · B A`` beside
    frozen weights. ``rank`` 0 is off: every weight trains. ``targets`` ⊆ attention, mlp (dense
    FFNs and shared experts), experts (routed experts); the router trains in full only with
    ``train_router``. ``base_dtype`` is the dtype the frozen weights are held in (adapters and
    routers stay fp32): ``auto`` is the ``--init`` weights' own dtype (a bf16 release stays bf16,
    2 bytes a parameter), fp32 for a model trained from scratch."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "experts")
    train_router: bool = False
    base_dtype: str = "auto"  # auto | fp32 | bf16 | fp16

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        _require(isinstance(self.rank, int) and self.rank >= 0, "train.lora.rank", self.rank, "must be an integer >= 0 (0 = off)")
        _require(self.alpha > 0, "train.lora.alpha", self.alpha, "must be > 0")
        _require(
            bool(self.targets) and all(t in LORA_TARGETS for t in self.targets),
            "train.lora.targets", list(self.targets), f"must be a non-empty subset of {list(LORA_TARGETS)}",
        )
        _require(self.base_dtype in LORA_BASE_DTYPES, "train.lora.base_dtype", self.base_dtype,
                 f"must be one of {list(LORA_BASE_DTYPES)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / max(self.rank, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, logging and checkpointing of one training run."""

    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay; moelab.train.schedule)
    decay_fraction: float = 0.2  # wsd: share of `steps` in the final decay, in (0, 1]
    decay_shape: str = "linear"  # wsd: linear | sqrt (1 - sqrt, Hägele et al. 2024) | cosine
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # fp32 | bf16 (autocast over fp32 weights) | bf16-master (bf16 weights, fp32 master copy in the optimizer)
    # | auto (bf16 autocast where moelab.hardware.bf16_is_fast)
    precision: str = "auto"
    objective: str = "causal"  # causal | prefix | mlm | span (moelab.objectives; span trains an encoder-decoder)
    eval_every: int = 100  # steps; 0 = only at the end
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    seed: int = 0
    device: str = "cpu"
    tensorboard: bool = False
    progress: bool = True  # rich progress bar
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # rank 0 = off (full fine-tuning)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every", "keep_last", "max_bad_steps"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"train.{name}", value, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"train.{name}", value, "must be an integer >= 0")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _require(0.0 <= self.beta1 < 1.0, "train.beta1", self.beta1, "must be in [0, 1)")
        _require(0.0 <= self.beta2 < 1.0, "train.beta2", self.beta2, "must be in [0, 1)")
        _require(self.eps > 0, "train.eps", self.eps, "must be > 0")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _one_of("train.precision", self.precision, PRECISIONS)
        _require(
            not (self.precision == "bf16-master" and self.lora.enabled),
            "train.precision", self.precision,
            "bf16-master trains every weight from an fp32 master copy; a LoRA run (train.lora.rank > 0) trains "
            "fp32 adapters over a frozen base: use train.precision=bf16 with train.lora.base_dtype=bf16",
        )
        _one_of("train.objective", self.objective, OBJECTIVE_NAMES)
        _one_of("train.schedule", self.schedule, SCHEDULE_NAMES)
        _one_of("train.decay_shape", self.decay_shape, DECAY_SHAPES)
        _require(
            not isinstance(self.decay_fraction, bool) and 0.0 < self.decay_fraction <= 1.0,
            "train.decay_fraction", self.decay_fraction, "must be in (0, 1]",
        )
        if self.schedule == "wsd":  # decay steps as in moelab.train.schedule.decay_steps
            decay = max(1, round(self.decay_fraction * self.steps))
            _require(
                self.warmup_steps + decay <= self.steps,
                "train.warmup_steps", self.warmup_steps,
                f"with schedule=wsd, warmup and the final decay ({decay} of {self.steps} steps) must not overlap: "
                "lower train.warmup_steps or train.decay_fraction, or raise train.steps",
            )


@dataclass(frozen=True)
class RunConfig:
    """One experiment: a model, its data and how it is trained. Saved as ``config.yaml`` in checkpoints."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.max_seq_len={self.model.max_seq_len}",
        )


_RUN_PRESETS: dict[str, dict[str, Any]] = {
    # Well under a minute on 2 CPU cores: the test suite runs `moelab compare --preset smoke`.
    "smoke": dict(
        data=dict(tokenizer="bytes", seq_len=64, max_bytes_per_domain=60_000, synthetic_docs=60),
        train=dict(
            steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=15, eval_batches=4, log_every=5, precision="fp32"
        ),
    ),
    # The default of `moelab compare`: 3 seeds x (MoE + twin) in under 15 minutes on 2 idle CPU cores (two runs
    # side by side at ~6.5k tokens/s each: 800 steps; 1000 took 16.4 min). fp32, not auto: at d_model 64-128 bf16
    # autocast is no faster on CPU (cast overhead outweighs the matmul gain; docs/training.md).
    "tiny": dict(
        data=dict(seq_len=128, max_bytes_per_domain=1_500_000, synthetic_docs=600),
        train=dict(steps=800, batch_size=16, lr=3e-3, warmup_steps=50, eval_every=100, eval_batches=16, precision="fp32"),
    ),
    # A model worth a GPU hour.
    "small": dict(
        data=dict(seq_len=512, max_bytes_per_domain=20_000_000, synthetic_docs=5000, tokenizer_train_bytes=20_000_000),
        train=dict(steps=5000, batch_size=32, lr=1e-3, warmup_steps=200, eval_every=500, eval_batches=32),
    ),
}


def run_preset(name: str) -> RunConfig:
    """A named run (``smoke``, ``tiny``, ``small``): the model preset of the same name plus data and training."""
    if name not in _RUN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}: expected one of {', '.join(map(repr, sorted(_RUN_PRESETS)))}")
    data = {"name": name, "model": _PRESETS[name], **_RUN_PRESETS[name]}
    return from_dict(RunConfig, data)


def normalize_run_overrides(overrides: Iterable[str]) -> list[str]:
    """Let run-level ``--set`` keys omit ``model.``: ``moe.top_k=1`` means ``model.moe.top_k=1``."""
    run_fields = {f.name for f in fields(RunConfig)}
    model_fields = {f.name for f in fields(ModelConfig)}
    out = []
    for item in overrides:
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        out.append(f"model.{item.strip()}" if head not in run_fields and head in model_fields else item)
    return out


def read_config_file(path: str | Path) -> Mapping[str, Any]:
    """The mapping a YAML (or ``.json``) config file holds; ConfigError naming the file otherwise.

    Why one reader: every way a file can be wrong gets one line that says what it is (missing,
    a directory or device, not UTF-8 with the byte offset, not valid YAML/JSON, not a mapping).
    An empty file (or one of comments only) is refused rather than read as "all defaults": it is
    more often a truncated or wrong file than a wish; ``{}`` says "every default" explicitly.
    """
    from moelab.textfile import read_text_file

    p = Path(path)
    text = read_text_file(p, "config file", ConfigError, hint="pass a YAML or JSON config")
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if p.suffix == ".json" and text.strip() else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid {kind}: {' '.join(str(exc).split())}") from None
    if data is None:  # YAML of nothing: an empty file, blank lines or comments only
        raise ConfigError(
            f"config file {str(p)!r} holds no settings (it is empty or only comments): write the fields to "
            "change, e.g. 'd_model: 256', or '{}' to mean every default"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of fields, got {type(data).__name__}")
    return data


def load_run_config(path: str | Path) -> RunConfig:
    """:func:`load_config` of a :class:`RunConfig` (a file of model fields only is a default run's ``model:``)."""
    return load_config(path, RunConfig)


# ----------------------------------------------------------------------------- generic (de)serialisation

T = TypeVar("T")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, path: str) -> Any:
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        _fail(path, value, "may not be null")
    if is_dataclass(inner):
        if is_dataclass(value):
            return value
        if hasattr(inner, "from_data"):
            return inner.from_data(value, path)
        if not isinstance(value, Mapping):
            _fail(path, value, f"expected a mapping of {inner.__name__} fields")
        return _from_mapping(inner, value, path + ".")
    origin = typing.get_origin(inner)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "expected a list")
        (item_type, *_rest) = typing.get_args(inner) or (Any,)
        return tuple(_coerce(item_type, v, path) for v in value)
    if inner is bool:
        if not isinstance(value, bool):
            _fail(path, value, "expected true or false")
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, value, "expected an integer")
        return value
    if inner is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "expected a number")
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            _fail(path, value, "expected a string")
        return value
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = _hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown field {prefix}{unknown[0]}: {cls.__name__} has {', '.join(names)}"
        )
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in names if name in data}
    return cls(**kwargs)


def _section_prefix(cls: type) -> str:
    return {
        "ModelConfig": "model.",
        "MoEConfig": "moe.",
        "RouterConfig": "moe.router.",
        "DataConfig": "data.",
        "TrainConfig": "train.",
    }.get(cls.__name__, "")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str | None = None) -> T:
    """Build dataclass ``cls`` from plain data, checking every key and type; messages name fields
    ``prefix + name`` (default: the section's own, ``moe.`` for MoEConfig)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    if hasattr(cls, "from_data"):
        return cls.from_data(data)  # type: ignore[attr-defined,no-any-return]
    return _from_mapping(cls, data, _section_prefix(cls) if prefix is None else prefix)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (lists for tuples), suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
        if hasattr(v, "to_data"):  # an open section (RouterConfig): its own YAML shape
            return {k: plain(x) for k, x in v.to_data().items()}
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is invalid: expected KEY=VALUE, e.g. moe.num_experts=16")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} is invalid: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Apply dotted ``KEY=VALUE`` overrides (``moe.num_experts=16``, ``moe=null``).

    Values are parsed as YAML scalars/lists. Setting a field under ``moe`` on a dense config
    creates a default MoE block first. Unknown keys raise ConfigError listing the allowed ones.

    A key may carry the section's own prefix: on a :class:`ModelConfig`, ``model.d_model=256``
    means ``d_model=256``. Why: run commands take ``model.``-prefixed keys and error messages
    name fields with it (``model.d_model=65 is invalid``), so a user copies that spelling into
    ``moelab config --set``; reading it as an unknown key ``model`` hid the real constraint.
    """
    data = to_dict(cfg)
    cls = type(cfg)
    own = _section_prefix(cls).rstrip(".").split(".")
    for item in overrides:
        path, value = _parse_override(item)
        typed = ".".join(path)  # messages echo the key as the user wrote it
        if own != [""] and path[: len(own)] == own and path[0] not in _hints(cls) and len(path) > len(own):
            path = path[len(own) :]
        node, node_cls = data, cls
        for depth, part in enumerate(path):
            hints = _hints(node_cls)
            if getattr(node_cls, "OPEN", False) and depth == len(path) - 1:  # any option of the router
                node[part] = value
                break
            if part not in hints:
                where = ".".join(path[:depth]) or node_cls.__name__
                raise ConfigError(f"unknown key {typed!r} in --set: {where} has {', '.join(hints)}")
            if depth == len(path) - 1:
                node[part] = value
                break
            child_type, _ = _strip_optional(hints[part])
            if not is_dataclass(child_type):
                raise ConfigError(f"--set key {typed!r}: {part!r} is a value, not a section")
            if node.get(part) is None:
                node[part] = to_dict(child_type())
            node, node_cls = node[part], child_type
    return from_dict(cls, data)


def load_config(path: str | Path, cls: type[T] = ModelConfig) -> T:  # type: ignore[assignment]
    """Read a YAML or JSON file into ``cls`` (the one config reader: :func:`read_config_file`'s checks, then
    :func:`from_dict`'s). For a :class:`RunConfig`, a file holding only model fields is taken as ``model:`` of a
    default run, so a model config file also names a run."""
    data = read_config_file(path)
    if cls is RunConfig and data and not set(data) & {f.name for f in fields(RunConfig)}:
        data = {"model": data}
    return from_dict(cls, data)


def config_text(cfg: Any, suffix: str = ".yaml") -> str:
    """``cfg`` as YAML, or JSON when ``suffix`` is ``.json``: what :func:`save_config` writes."""
    data = to_dict(cfg)
    return json.dumps(data, indent=2) + "\n" if suffix == ".json" else yaml.safe_dump(data, sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (or JSON when the suffix is .json)."""
    p = Path(path)
    p.write_text(config_text(cfg, p.suffix), encoding="utf-8")


__all__ = [
    "IGNORE_INDEX",
    "ConfigError",
    "DataConfig",
    "LoRAConfig",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "RouterConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "check_field",
    "check_one_of",
    "config_text",
    "from_dict",
    "load_config",
    "load_run_config",
    "normalize_run_overrides",
    "preset",
    "preset_names",
    "replace",
    "run_preset",
    "save_config",
    "to_dict",
]
