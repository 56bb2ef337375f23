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
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


def _require(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(path, value, allowed)


def _one_of(path: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = sorted(allowed)
    _require(value in allowed, path, value, f"expected one of {', '.join(map(repr, allowed))}")


ACTIVATIONS = ("swiglu", "gelu")
NORMS = ("rmsnorm", "layernorm")
ATTENTION_KINDS = ("causal", "prefix", "bidirectional")
PLACEMENTS = ("all", "every_n", "first_k_dense", "explicit")


@dataclass(frozen=True)
class RouterConfig:
    """Which router sends tokens to experts, and its options.

    ``name`` is looked up in the router registry (``moelab routers`` lists it); options that a
    router does not use are ignored by it, and each router validates the ones it does use.
    """

    name: str = "topk"
    renormalize: bool = True  # top-k weights renormalised to sum to 1 (Mixtral) or left as probabilities
    softmax_after_topk: bool = False  # softmax over the k kept logits instead of over all E
    jitter_eps: float = 0.0  # Switch: multiplicative uniform noise in [1-eps, 1+eps] on inputs, training only
    noise_std: float = 1.0  # noisy top-k: scale of the learned Gaussian noise
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts split into n_group groups
    topk_group: int = 1  # ... of which the best topk_group groups are searched
    routed_scaling_factor: float = 1.0  # combine weights multiplied by this (DeepSeek-V3)
    bias_update_rate: float = 0.001  # aux-loss-free balancing step size (gamma)
    hash_seed: int = 0  # hash routing: seed of the token-id → expert table
    force_balanced: bool = False  # uniform round-robin assignment, for throughput benchmarks

    def __post_init__(self) -> None:
        _require(self.jitter_eps >= 0, "moe.router.jitter_eps", self.jitter_eps, "must be >= 0")
        _require(self.noise_std >= 0, "moe.router.noise_std", self.noise_std, "must be >= 0")
        _require(self.n_group >= 1, "moe.router.n_group", self.n_group, "must be >= 1")
        _require(
            1 <= self.topk_group <= self.n_group,
            "moe.router.topk_group",
            self.topk_group,
            f"must be between 1 and moe.router.n_group={self.n_group}",
        )
        _require(
            self.routed_scaling_factor > 0,
            "moe.router.routed_scaling_factor",
            self.routed_scaling_factor,
            "must be > 0",
        )
        _require(self.bias_update_rate >= 0, "moe.router.bias_update_rate", self.bias_update_rate, "must be >= 0")


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
    router: RouterConfig = field(default_factory=RouterConfig)
    aux_loss: str = "load_balance"  # balance loss, by name in the loss registry
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "position"  # which assignments an over-full expert drops
    placement: str = "all"  # all | every_n | first_k_dense | explicit
    every_n: int = 2  # placement=every_n: layers n-1, 2n-1, ... are MoE
    first_k_dense: int = 1  # placement=first_k_dense: the first k layers stay dense
    layers: tuple[int, ...] = ()  # placement=explicit: these layer indices are MoE
    dispatch: str = "auto"  # dispatch backend, by name in the dispatch registry (auto: fastest measured)

    def __post_init__(self) -> None:
        # Registries are imported lazily: config stays importable without torch-heavy modules.
        from moelab.moe.capacity import DROP_POLICIES
        from moelab.moe.dispatch import DISPATCHERS
        from moelab.moe.losses import BALANCE_LOSSES
        from moelab.moe.routers import ROUTERS

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
        _one_of("moe.router.name", self.router.name, ROUTERS)
        _one_of("moe.aux_loss", self.aux_loss, BALANCE_LOSSES)
        _require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        _require(self.z_loss_coef >= 0, "moe.z_loss_coef", self.z_loss_coef, "must be >= 0")
        if self.capacity_factor is not None:
            _require(
                math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
                "moe.capacity_factor",
                self.capacity_factor,
                "must be > 0, or null for dropless routing",
            )
        _one_of("moe.drop_policy", self.drop_policy, DROP_POLICIES)
        _one_of("moe.placement", self.placement, PLACEMENTS)
        _require(self.every_n >= 1, "moe.every_n", self.every_n, "must be >= 1")
        _require(self.first_k_dense >= 0, "moe.first_k_dense", self.first_k_dense, "must be >= 0")
        if self.placement == "explicit":
            _require(len(self.layers) > 0, "moe.layers", self.layers, "placement=explicit needs a non-empty list")
        _one_of("moe.dispatch", self.dispatch, DISPATCHERS)
        ROUTERS[self.router.name].validate(self)

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

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}", value, "must be a positive integer")
        _require(
            self.d_model % self.n_heads == 0,
            "model.d_model",
            self.d_model,
            f"must be divisible by model.n_heads={self.n_heads}",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        _require(self.head_dim % 2 == 0, "model.d_model", self.d_model, "d_model / n_heads must be even (RoPE)")
        _one_of("model.activation", self.activation, ACTIVATIONS)
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
        return self.d_model // self.n_heads

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
    return {"ModelConfig": "model.", "MoEConfig": "moe.", "RouterConfig": "moe.router."}.get(cls.__name__, "")


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build dataclass ``cls`` from plain data, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    return _from_mapping(cls, data, _section_prefix(cls))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (lists for tuples), suitable for YAML and JSON."""

    def plain(v: Any) -> Any:
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
    """
    data = to_dict(cfg)
    cls = type(cfg)
    for item in overrides:
        path, value = _parse_override(item)
        node, node_cls = data, cls
        for depth, part in enumerate(path):
            hints = _hints(node_cls)
            if part not in hints:
                where = ".".join(path[:depth]) or node_cls.__name__
                raise ConfigError(
                    f"unknown key {'.'.join(path)!r} in --set: {where} has {', '.join(hints)}"
                )
            if depth == len(path) - 1:
                node[part] = value
                break
            child_type, _ = _strip_optional(hints[part])
            if not is_dataclass(child_type):
                raise ConfigError(f"--set key {'.'.join(path)!r}: {part!r} is a value, not a section")
            if node.get(part) is None:
                node[part] = to_dict(child_type())
            node, node_cls = node[part], child_type
    return from_dict(cls, data)


def load_config(path: str | Path, cls: type[T] = ModelConfig) -> T:  # type: ignore[assignment]
    """Read a YAML or JSON file into ``cls``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        data = {}
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (or JSON when the suffix is .json)."""
    p = Path(path)
    data = to_dict(cfg)
    text = json.dumps(data, indent=2) + "\n" if p.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    p.write_text(text, encoding="utf-8")


__all__ = [
    "ConfigError",
    "MoEConfig",
    "ModelConfig",
    "RouterConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "preset",
    "preset_names",
    "replace",
    "save_config",
    "to_dict",
]
