"""The mapping engine: rules that move tensors between moelab and Hugging Face names.

A family's table (``moelab.convert.tables``) maps each moelab parameter name (relative to the
model or to ``blocks.{i}.``) to a *spec*: a plain HF name (same tensor), or a small object that
says how to build the tensor (transpose, concatenate, split, stack experts, permute RoPE rows).
:func:`build_rules` turns a table into concrete :class:`Rule` s for one config; :func:`iter_import`
and :func:`iter_export` run them one rule at a time (:func:`import_tensors` / :func:`export_tensors`
collect the results in a dict). Nothing is matched by guesswork: a moelab tensor with no rule, an HF
tensor the rules do not read, or a rule whose tensors are missing is an error that lists the names,
raised from the names alone, before any tensor is read.

Streaming (:func:`plan_import`, :func:`fill_model`): a rule reads only the HF tensors it needs (from a
dict, or a :class:`~moelab.safetensors_reader.SafetensorsReader` that reads each on demand) and writes
them straight into the model's preallocated parameters: a reader with an ``into`` copies each source,
converted to the parameter's dtype, into its slice of the destination (the rows of one expert, the
gate or up half), so stacking experts or concatenating gate‖up allocates nothing; a reader without
one (a scale, a row permutation) computes its small result in the stored dtype and copies it. Either
way the parameter holds exactly what ``to_ours`` gives, converted once. The export functions also run
on ``meta`` tensors, which gives an export's names, dtypes and shapes before anything is computed.

Legend: E experts, F expert hidden, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.config import ModelConfig
from moelab.errors import UserError
from moelab.model.materialize import Filler

Fn = Callable[[list[Tensor]], list[Tensor]]
Into = Callable[[list[Tensor], list[Tensor]], None]  # (sources, destinations): what to_ours gives, written in place


def _same(ts: list[Tensor]) -> list[Tensor]:
    return list(ts)


class ShapeError(ValueError):
    """Source ``index`` (of a reader's names) does not fit its place in a moelab parameter."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def copy_into(dst: Tensor, src: Tensor, index: int = 0) -> None:
    """``dst.copy_(src)`` (converting the dtype) for equal shapes only: ``copy_`` would broadcast a wrong one."""
    if tuple(dst.shape) != tuple(src.shape):
        raise ShapeError(f"gives {list(src.shape)} where the model's config needs {list(dst.shape)}", index)
    dst.copy_(src)


def _copy_all(ts: list[Tensor], dst: list[Tensor]) -> None:
    for i, (d, t) in enumerate(zip(dst, ts, strict=True)):
        copy_into(d, t, i)


def _parts_into(ts: list[Tensor], dst: Tensor, dim: int, first: int = 0) -> None:
    """Equal parts concatenated on ``dim`` (as the tables store gate‖up), written into ``dst`` part by part;
    ``first`` is the index of ``ts[0]`` among the reader's names (for messages)."""
    for i, (d, t) in enumerate(zip(dst.chunk(len(ts), dim), ts)):
        copy_into(d, t, first + i)


@dataclass(frozen=True)
class Reader:
    """One HF layout a rule accepts: its names, the function to moelab tensors, and optionally ``into``,
    which writes exactly ``to_ours``'s result into preallocated destinations without building it."""

    names: tuple[str, ...]
    to_ours: Fn
    into: Into | None = None

    def write(self, sources: list[Tensor], dst: list[Tensor]) -> None:
        if self.into is not None:
            self.into(sources, dst)
        else:
            _copy_all(self.to_ours(sources), dst)


@dataclass(frozen=True)
class Rule:
    """Moves ``ours`` ↔ ``theirs``. ``readers`` lists the HF layouts accepted on import, first preferred;
    ``to_theirs`` writes the first reader's names."""

    ours: tuple[str, ...]
    readers: tuple[Reader, ...]
    to_theirs: Fn = _same

    @property
    def theirs(self) -> tuple[str, ...]:
        return self.readers[0].names


def _plain(names: tuple[str, ...]) -> Reader:
    """The same tensors under other names."""
    return Reader(names, _same, _copy_all)


class Spec:
    """How one table entry becomes a Rule, given the full moelab names, the HF prefix and the config."""

    def rule(self, ours: tuple[str, ...], prefix: str, cfg: ModelConfig) -> Rule:
        raise NotImplementedError


@dataclass(frozen=True)
class Same(Spec):
    name: str

    def rule(self, ours, prefix, cfg):
        return Rule(ours, (_plain((prefix + self.name,)),))


@dataclass(frozen=True)
class Alt(Spec):
    """Same tensor under one of several names; export writes the first (Mixtral's old and new block names)."""

    names: tuple[str, ...]

    def rule(self, ours, prefix, cfg):
        return Rule(ours, tuple(_plain((prefix + n,)) for n in self.names))


@dataclass(frozen=True)
class Transposed(Spec):
    """GPT-2 ``Conv1D`` weights are stored ``[in, out]``; ``nn.Linear`` is ``[out, in]``."""

    name: str

    def rule(self, ours, prefix, cfg):
        def t(ts: list[Tensor]) -> list[Tensor]:
            return [x.t().contiguous() for x in ts]

        def into(ts: list[Tensor], dst: list[Tensor]) -> None:
            _copy_all([x.t() for x in ts], dst)

        return Rule(ours, (Reader((prefix + self.name,), t, into),), t)


@dataclass(frozen=True)
class Cat(Spec):
    """One moelab tensor = several HF tensors of equal size concatenated on ``dim`` (SwiGLU gate ‖ up)."""

    names: tuple[str, ...]
    dim: int = 0

    def rule(self, ours, prefix, cfg):
        n, dim = len(self.names), self.dim
        names = tuple(prefix + x for x in self.names)
        return Rule(
            ours,
            (Reader(names, lambda ts: [torch.cat(ts, dim)], lambda ts, dst: _parts_into(ts, dst[0], dim)),),
            lambda ts: [x.contiguous() for x in ts[0].chunk(n, dim)],
        )


@dataclass(frozen=True)
class Split(Spec):
    """Several moelab tensors (q, k, v) = one HF tensor split in equal parts; ``transpose`` for Conv1D."""

    name: str
    transpose: bool = False

    def rule(self, ours, prefix, cfg):
        n, tr = len(ours), self.transpose

        def parts(ts: list[Tensor]) -> tuple[Tensor, ...]:
            return (ts[0].t() if tr else ts[0]).chunk(n, 0)

        def to_ours(ts: list[Tensor]) -> list[Tensor]:
            return [p.contiguous() for p in parts(ts)]

        def to_theirs(ts: list[Tensor]) -> list[Tensor]:
            x = torch.cat(ts, 0)
            return [x.t().contiguous() if tr else x]

        def into(ts: list[Tensor], dst: list[Tensor]) -> None:
            _copy_all(list(parts(ts)), dst)

        return Rule(ours, (Reader((prefix + self.name,), to_ours, into),), to_theirs)


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

        def into_per_expert(ts: list[Tensor], dst: list[Tensor]) -> None:
            for e in range(E):  # expert e's rows: its gate rows, then its up rows
                _parts_into(ts[e * parts : (e + 1) * parts], dst[0][e], 0, e * parts)

        def to_per_expert(ts: list[Tensor]) -> list[Tensor]:
            return [p.contiguous() for w in ts[0].unbind(0) for p in w.chunk(parts, 0)]

        readers: tuple[Reader, ...] = (Reader(names, from_per_expert, into_per_expert),)
        if self.fused is not None:
            readers += (_plain((prefix + self.fused,)),)
        return Rule(ours, readers, to_per_expert)


@dataclass(frozen=True)
class Scaled(Spec):
    """Same tensor times ``factor(cfg)`` on import, divided by it on export.

    T5 does not scale its attention logits by 1/sqrt(d_kv); moelab does, so T5's query weights
    carry sqrt(d_kv) in moelab (the product q·k is then exactly T5's).
    """

    name: str
    factor: Callable[[ModelConfig], float]

    def rule(self, ours, prefix, cfg):
        f = self.factor(cfg)
        return Rule(ours, (Reader((prefix + self.name,), lambda ts: [ts[0] * f]),), lambda ts: [ts[0] / f])


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

        return Rule(ours, (Reader((prefix + self.name,), permute(perm)),), permute(inv))


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


def table_rules(table: Table, ours_prefix: str, hf_prefix: str, cfg: ModelConfig, keys: set[str]) -> list[Rule]:
    """Rules of the entries of ``table`` whose moelab names (under ``ours_prefix``) are in ``keys``."""
    rules: list[Rule] = []
    for k, v in table.items():
        names = (k,) if isinstance(k, str) else k
        full = tuple(ours_prefix + n for n in names)
        present = [n in keys for n in full]
        if not any(present):
            continue
        if not all(present):
            raise AssertionError(f"table entry {names} only partly matches the model")  # a table bug
        rules.append(_spec(v).rule(full, hf_prefix, cfg))
    return rules


def check_covered(rules: list[Rule], keys: set[str]) -> list[Rule]:
    """``rules`` if they cover every moelab key; else UserError naming the rest."""
    covered = {n for r in rules for n in r.ours}
    unmapped = sorted(keys - covered)
    if unmapped:
        raise UserError(f"this model has tensors the mapping cannot express: {', '.join(unmapped[:12])}")
    return rules


def build_rules(tables: Tables, cfg: ModelConfig, model_keys: list[str]) -> list[Rule]:
    """One rule per table entry whose moelab names exist in ``model_keys``; every key must be covered."""
    keys = set(model_keys)
    rules = table_rules(tables.top, "", "", cfg, keys)
    for i in range(cfg.n_layers):
        rules += table_rules(tables.layer, f"blocks.{i}.", tables.layer_prefix.format(i=i), cfg, keys)
    return check_covered(rules, keys)


@dataclass(frozen=True)
class Step:
    """One rule's import: the moelab names it fills and the HF tensors it reads (from ``source``)."""

    ours: tuple[str, ...]
    reader: Reader
    source: Mapping[str, Tensor]

    def tensors(self) -> list[Tensor]:
        """The moelab tensors, computed in the stored dtype (``to_ours``)."""
        return self.reader.to_ours([self.source[n] for n in self.reader.names])

    def write(self, dst: list[Tensor], where: str = "the checkpoint") -> None:
        """Write the same values into the preallocated ``dst`` (one per ``ours`` name), converting the dtype."""
        try:
            self.reader.write([self.source[n] for n in self.reader.names], dst)
        except ShapeError as exc:
            name = self.reader.names[exc.index]
            raise UserError(f"{where}: tensor {name!r} {exc} (for {', '.join(self.ours)})") from None


def plan_import(rules: list[Rule], theirs: Mapping[str, Tensor], ignore: Callable[[str], bool]) -> list[Step]:
    """The :class:`Step` of every rule (its first reader whose names ``theirs`` has), from the names alone.

    Missing or unexpected HF names raise UserError listing them before any tensor is read.
    """
    steps: list[Step] = []
    missing: list[str] = []
    for rule in rules:
        for reader in rule.readers:
            if all(n in theirs for n in reader.names):
                steps.append(Step(rule.ours, reader, theirs))
                break
        else:
            missing.extend(n for n in rule.theirs if n not in theirs)
    if missing:
        raise UserError(f"{len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:12])}")
    used = {n for step in steps for n in step.reader.names}
    unexpected = sorted(n for n in theirs if n not in used and not ignore(n))
    if unexpected:
        raise UserError(
            f"{len(unexpected)} unexpected tensor(s) in the checkpoint (not read by the mapping): "
            f"{', '.join(unexpected[:12])}"
        )
    return steps


def iter_import(
    rules: list[Rule], theirs: Mapping[str, Tensor], ignore: Callable[[str], bool]
) -> Iterator[tuple[str, Tensor]]:
    """HF tensors → ``(moelab name, tensor)`` pairs, one rule at a time, in the stored dtype."""
    for step in plan_import(rules, theirs, ignore):
        yield from zip(step.ours, step.tensors())


def import_tensors(
    rules: list[Rule], theirs: Mapping[str, Tensor], ignore: Callable[[str], bool]
) -> dict[str, Tensor]:
    """HF tensors → moelab state dict (:func:`iter_import` collected)."""
    return dict(iter_import(rules, theirs, ignore))


def fill_model(filler: Filler, rules: list[Rule], theirs: Mapping[str, Tensor], ignore: Callable[[str], bool]) -> None:
    """Stream ``theirs`` into the meta-built model of ``filler``, rule by rule (see the module doc), then
    :meth:`~moelab.model.materialize.Filler.finish`. The result equals loading :func:`import_tensors`'s dict
    and casting it to the model's dtypes, bit for bit."""
    for step in plan_import(rules, theirs, ignore):
        dst = [filler.allocate(n) for n in step.ours]
        step.write(dst, filler.where)
        for n in step.ours:
            filler.loaded(n)
    filler.finish()


def iter_export(rules: list[Rule], ours: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """moelab state dict → ``(HF name, tensor)`` pairs (first reader layout of every rule), one rule at a
    time; with ``meta`` tensors in ``ours`` it gives the names, dtypes and shapes for free."""
    for rule in rules:
        for n, t in zip(rule.theirs, rule.to_theirs([ours[n] for n in rule.ours])):
            yield n, t.detach().contiguous()


def export_tensors(rules: list[Rule], ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """moelab state dict → HF tensors (:func:`iter_export` collected)."""
    return dict(iter_export(rules, ours))
