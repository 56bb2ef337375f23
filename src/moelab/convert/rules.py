"""The mapping engine: rules that move tensors between moelab and Hugging Face names.

A family's table (``moelab.convert.tables``) maps each moelab parameter name (relative to the
model or to ``blocks.{i}.``) to a *spec*: a plain HF name (same tensor), or a small object that
says how to build the tensor (transpose, concatenate, split, stack experts, permute RoPE rows).
:func:`build_rules` turns a table into concrete :class:`Rule` s for one config; :func:`import_tensors`
and :func:`export_tensors` run them. Nothing is matched by guesswork: a moelab tensor with no
rule, an HF tensor the rules do not read, or a rule whose tensors are missing is an error that
lists the names.

Legend: E experts, F expert hidden, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.config import ModelConfig
from moelab.errors import UserError

Fn = Callable[[list[Tensor]], list[Tensor]]


def _same(ts: list[Tensor]) -> list[Tensor]:
    return list(ts)


@dataclass(frozen=True)
class Rule:
    """Moves ``ours`` ↔ ``theirs``. ``readers`` lists the HF layouts accepted on import, first preferred.

    Each reader is ``(hf_names, to_ours)``; ``to_theirs`` writes the first reader's names.
    """

    ours: tuple[str, ...]
    readers: tuple[tuple[tuple[str, ...], Fn], ...]
    to_theirs: Fn = _same

    @property
    def theirs(self) -> tuple[str, ...]:
        return self.readers[0][0]


class Spec:
    """How one table entry becomes a Rule, given the full moelab names, the HF prefix and the config."""

    def rule(self, ours: tuple[str, ...], prefix: str, cfg: ModelConfig) -> Rule:
        raise NotImplementedError


@dataclass(frozen=True)
class Same(Spec):
    name: str

    def rule(self, ours, prefix, cfg):
        return Rule(ours, (((prefix + self.name,), _same),))


@dataclass(frozen=True)
class Alt(Spec):
    """Same tensor under one of several names; export writes the first (Mixtral's old and new block names)."""

    names: tuple[str, ...]

    def rule(self, ours, prefix, cfg):
        return Rule(ours, tuple(((prefix + n,), _same) for n in self.names))


@dataclass(frozen=True)
class Transposed(Spec):
    """GPT-2 ``Conv1D`` weights are stored ``[in, out]``; ``nn.Linear`` is ``[out, in]``."""

    name: str

    def rule(self, ours, prefix, cfg):
        def t(ts: list[Tensor]) -> list[Tensor]:
            return [x.t().contiguous() for x in ts]

        return Rule(ours, (((prefix + self.name,), t),), t)


@dataclass(frozen=True)
class Cat(Spec):
    """One moelab tensor = several HF tensors of equal size concatenated on ``dim`` (SwiGLU gate ‖ up)."""

    names: tuple[str, ...]
    dim: int = 0

    def rule(self, ours, prefix, cfg):
        n, dim = len(self.names), self.dim
        return Rule(
            ours,
            ((tuple(prefix + x for x in self.names), lambda ts: [torch.cat(ts, dim)]),),
            lambda ts: [x.contiguous() for x in ts[0].chunk(n, dim)],
        )


@dataclass(frozen=True)
class Split(Spec):
    """Several moelab tensors (q, k, v) = one HF tensor split in equal parts; ``transpose`` for Conv1D."""

    name: str
    transpose: bool = False

    def rule(self, ours, prefix, cfg):
        n, tr = len(ours), self.transpose

        def to_ours(ts: list[Tensor]) -> list[Tensor]:
            x = ts[0].t() if tr else ts[0]
            return [p.contiguous() for p in x.chunk(n, 0)]

        def to_theirs(ts: list[Tensor]) -> list[Tensor]:
            x = torch.cat(ts, 0)
            return [x.t().contiguous() if tr else x]

        return Rule(ours, (((prefix + self.name,), to_ours),), to_theirs)


@dataclass(frozen=True)
class ExpertStack(Spec):
    """``[E, …]`` moelab expert tensor ↔ per-expert HF tensors (``{e}`` in the names), or one fused tensor.

    ``per_expert`` names are concatenated on dim 0 for each expert (gate rows then up rows), then
    stacked over experts. ``fused`` is transformers' in-memory layout (``gate_up_proj [E, 2F, D]``,
    ``down_proj [E, D, F]``), read as is. Export writes the per-expert layout, which every
    transformers version loads.
    """

    per_expert: tuple[str, ...]
    fused: str | None = None

    def rule(self, ours, prefix, cfg):
        assert cfg.moe is not None
        E, parts = cfg.moe.num_experts, len(self.per_expert)
        names = tuple(prefix + n.format(e=e) for e in range(E) for n in self.per_expert)

        def from_per_expert(ts: list[Tensor]) -> list[Tensor]:
            return [torch.stack([torch.cat(ts[e * parts : (e + 1) * parts], 0) for e in range(E)])]

        def to_per_expert(ts: list[Tensor]) -> list[Tensor]:
            return [p.contiguous() for w in ts[0].unbind(0) for p in w.chunk(parts, 0)]

        readers: tuple = ((names, from_per_expert),)
        if self.fused is not None:
            readers += (((prefix + self.fused,), _same),)
        return Rule(ours, readers, to_per_expert)


def rope_deinterleave(dim: int) -> Tensor:
    """Row order that turns interleaved RoPE pairs (x0,x1),(x2,x3)… into rotate-half halves (evens, odds)."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


@dataclass(frozen=True)
class RopeRows(Spec):
    """Same tensor with the RoPE rows of each head re-ordered (DeepSeek's ``rope_interleave``).

    ``head_rows`` rows per head, of which the last ``rope`` are RoPE rows (``heads`` = None: the
    head count of the config). Import de-interleaves; export interleaves back.
    """

    name: str
    head_rows: Callable[[ModelConfig], int]
    heads: Callable[[ModelConfig], int]
    rope: Callable[[ModelConfig], int]

    def rule(self, ours, prefix, cfg):
        rows, heads, rope = self.head_rows(cfg), self.heads(cfg), self.rope(cfg)
        perm = torch.arange(rows)
        perm[rows - rope :] = rows - rope + rope_deinterleave(rope)
        inv = torch.argsort(perm)

        def permute(order: Tensor) -> Fn:
            def f(ts: list[Tensor]) -> list[Tensor]:
                x = ts[0]
                return [x.reshape(heads, rows, *x.shape[1:])[:, order].reshape(x.shape).contiguous()]

            return f

        return Rule(ours, (((prefix + self.name,), permute(perm)),), permute(inv))


Table = Mapping[str | tuple[str, ...], "str | Spec"]


@dataclass(frozen=True)
class Tables:
    """A family's mapping: top-level names, per-layer names (relative to ``blocks.{i}.``) and HF prefixes."""

    top: Table
    layer: Table
    layer_prefix: str  # e.g. "model.layers.{i}."
    ignore: tuple[str, ...] = field(default=())  # HF names read by nobody and that is fine (buffers)


def _spec(v: str | Spec) -> Spec:
    return Same(v) if isinstance(v, str) else v


def build_rules(tables: Tables, cfg: ModelConfig, model_keys: list[str]) -> list[Rule]:
    """One rule per table entry whose moelab names exist in ``model_keys``; every key must be covered."""
    keys = set(model_keys)
    rules: list[Rule] = []

    def add(table: Table, ours_prefix: str, hf_prefix: str) -> None:
        for k, v in table.items():
            names = (k,) if isinstance(k, str) else k
            full = tuple(ours_prefix + n for n in names)
            present = [n in keys for n in full]
            if not any(present):
                continue
            if not all(present):
                raise AssertionError(f"table entry {names} only partly matches the model")  # a table bug
            rules.append(_spec(v).rule(full, hf_prefix, cfg))

    add(tables.top, "", "")
    for i in range(cfg.n_layers):
        add(tables.layer, f"blocks.{i}.", tables.layer_prefix.format(i=i))
    covered = {n for r in rules for n in r.ours}
    unmapped = sorted(keys - covered)
    if unmapped:
        raise UserError(f"this model has tensors the mapping cannot express: {', '.join(unmapped[:12])}")
    return rules


def import_tensors(
    rules: list[Rule], theirs: Mapping[str, Tensor], ignore: Callable[[str], bool]
) -> dict[str, Tensor]:
    """HF tensors → moelab state dict; missing or unexpected HF names raise UserError listing them."""
    ours: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        for names, fn in rule.readers:
            if all(n in theirs for n in names):
                for n, t in zip(rule.ours, fn([theirs[n] for n in names])):
                    ours[n] = t
                used.update(names)
                break
        else:
            missing.extend(n for n in rule.theirs if n not in theirs)
    if missing:
        raise UserError(f"{len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:12])}")
    unexpected = sorted(n for n in theirs if n not in used and not ignore(n))
    if unexpected:
        raise UserError(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint (not read by the mapping): "
            f"{', '.join(unexpected[:12])}"
        )
    return ours


def export_tensors(rules: list[Rule], ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """moelab state dict → HF tensors (first reader layout of every rule)."""
    out: dict[str, Tensor] = {}
    for rule in rules:
        for n, t in zip(rule.theirs, rule.to_theirs([ours[n] for n in rule.ours])):
            out[n] = t.detach().contiguous()
    return out
