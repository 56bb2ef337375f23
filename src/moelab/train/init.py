"""Start a training run from existing weights: ``moelab train --init PATH``.

Why: upcycled, converted or previously trained models should be trained further with the same
trainer (metrics, checkpoints, resume) as models trained from scratch, instead of a hand-written
loop. The source is a moelab model folder (``moelab upcycle`` / ``moelab convert --to moelab``),
a Hugging Face folder (imported on the fly), a checkpoint folder or a run folder (its newest
complete checkpoint).

The run's model section is the source's model config (``--set model.…`` may change fields that
keep every weight's shape, e.g. dropout or loss coefficients); data/train come from
``--config``/``--preset`` when given, else from the source's run config when it is a checkpoint,
else from the ``tiny`` preset. The tokenizer is the source's ``tokenizer.json`` when it has one;
otherwise the data's tokenizer may have at most the model's vocabulary size (released models pad
their embedding). Weights load strictly: same names and shapes, or a one-line :class:`UserError`.

The source is read by :func:`moelab.experiment.init_source.load_init_source` (it maps any folder
kind onto a model, a layer above training). Memory: the source is read once, streamed in its own
dtype (a bf16 release stays 2 bytes a parameter), and the run's model is built on the meta device
and filled from it tensor by tensor,
each source tensor dropped once copied (:func:`init_model`): the weights are held once. A LoRA run
keeps them in ``train.lora.base_dtype`` (``auto`` → the source's dtype), a full fine-tune in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from moelab.config import (
    ModelConfig,
    RunConfig,
    apply_overrides,
    load_run_config,
    normalize_run_overrides,
    run_preset,
)
from moelab.data.tokenizer import Tokenizer
from moelab.errors import ConfigError, UserError
from moelab.model.materialize import Filler, cast_on_meta, dtype_name, fill_by_names
from moelab.moe.validate import check_model_config

M = TypeVar("M", bound=nn.Module)


@dataclass
class InitSource:
    """The weights and configs found at ``--init PATH``; :func:`init_model` consumes ``state``."""

    path: Path
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor]  # plain state_dict names, in the source's dtype (routers fp32)
    run_cfg: RunConfig | None  # the source's run config (checkpoints only)
    tokenizer: Tokenizer | None  # the source's tokenizer.json, when it has one

    @classmethod
    def of_model(cls, name: str, model_cfg: ModelConfig, model: nn.Module, tokenizer: Tokenizer | None) -> InitSource:
        """A model in memory as a run's starting weights (a study's warm start: a MoEfied model, a shared
        seed model); ``name`` stands for its path in messages. ``model_cfg`` may differ from the model's
        own config in fields that keep the weights' shapes."""
        return cls(Path(name), model_cfg, dict(model.state_dict()), None, tokenizer)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the source's token embedding (its weights' dtype; routers are fp32 in every load)."""
        floats = [t for k, t in self.state.items() if t.is_floating_point() and "embed" in k]
        floats = floats or [t for t in self.state.values() if t.is_floating_point()]
        return floats[0].dtype if floats else torch.float32

    @property
    def nbytes(self) -> int:
        """Bytes the source's tensors hold (tied tensors once)."""
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.state.values()}
        return sum(seen.values())


def init_run_config(
    source: InitSource, config: str | None, preset: str | None, overrides: list[str]
) -> RunConfig:
    """The run: ``--config`` or ``--preset`` (else the source's run, else ``tiny``) with the source's model.

    ``overrides`` are ``--set`` items (``moe.x`` means ``model.moe.x``): data/train ones are applied
    before the model is swapped in, model ones after.
    """
    if config:
        base = load_run_config(config)
    elif preset:
        base = run_preset(preset)
    else:
        base = source.run_cfg if source.run_cfg is not None else run_preset("tiny")
    overrides = normalize_run_overrides(overrides)
    with contextlib.suppress(ConfigError):  # the base's data/train fit the source's model as they are
        return _resolve_base_dtype(apply_overrides(replace(base, model=source.model_cfg), overrides), source)
    # else data/train overrides first, so that e.g. data.seq_len can be fitted to the source's max_seq_len
    model_keys = [o for o in overrides if o.strip().startswith("model.")]
    base = apply_overrides(base, [o for o in overrides if o not in model_keys])
    try:
        cfg = replace(base, model=source.model_cfg)
    except ConfigError as exc:
        raise UserError(f"--init {str(source.path)!r}: {exc} (fix it with --set)") from None
    return _resolve_base_dtype(apply_overrides(cfg, model_keys), source)


def _resolve_base_dtype(cfg: RunConfig, source: InitSource) -> RunConfig:
    """``train.lora.base_dtype=auto`` → the source's dtype, written into the run's config (resume reads it);
    the model's router names and options checked (one line, before any data is prepared)."""
    cfg = replace(cfg, model=check_model_config(cfg.model))
    lora = cfg.train.lora
    if not lora.enabled or lora.base_dtype != "auto":
        return cfg
    return replace(cfg, train=replace(cfg.train, lora=replace(lora, base_dtype=dtype_name(source.dtype))))


def check_vocab(source: InitSource, tokenizer: Tokenizer) -> None:
    """Every id of the data's tokenizer must have an embedding row in the source's model. A model with
    more rows than its tokenizer has entries is fine (released models pad the vocabulary, e.g. OLMoE's
    50,304 rows for 50,280 tokens): the extra rows are never read."""
    want = source.model_cfg.vocab_size
    if tokenizer.vocab_size > want:
        raise UserError(
            f"--init {str(source.path)!r} has vocab_size {want} but the data's tokenizer has {tokenizer.vocab_size} "
            f"entries: set data.tokenizer to a tokenizer.json with at most {want} entries (or data.tokenizer=bytes "
            "for 259)"
        )


def init_model(build: Callable[[], M], source: InitSource, dtype: torch.dtype, device: torch.device) -> M:
    """``build()`` on the meta device, cast to ``dtype`` (routers and LoRA adapters fp32), and filled from
    ``source.state`` by name, strictly; each source tensor leaves ``source.state`` once copied.

    No free-memory check here: the source's bytes are already held and are given back as the model fills
    (the training-memory check of :func:`require_init_training_fits` counts them)."""
    with torch.device("meta"):
        model = build()
    cast_on_meta(model, dtype)
    where = f"--init {str(source.path)!r} does not fit the run's model"
    try:
        fill_by_names(Filler(model, device, where), source.state, consume=True)
    except UserError as exc:
        raise UserError(f"{exc}: --set model.* may change only fields that keep the weights' shapes") from None
    return model


def require_init_training_fits(source: InitSource, cfg: RunConfig) -> None:
    """Refuse (one line) a run from ``source`` whose training needs more memory than is free, counting
    the source's own bytes as free (the run's model takes their place): a full fine-tune of a 7B release
    (16 bytes a parameter) is refused here, its LoRA fine-tune in bf16 (≈2 bytes a parameter) is not."""
    from moelab.model.lora import base_dtype, lora_counts
    from moelab.model.memory_guard import require_training_fits
    from moelab.train.master_weights import MASTER_PRECISION, MASTER_WEIGHT_BYTES

    tc = cfg.train
    dtype = base_dtype(tc.lora)
    lowp = dtype != torch.float32 or tc.precision != "fp32"  # bf16 activations (bf16, bf16-master, auto)
    adapters, trainable = lora_counts(cfg.model, tc.lora) if tc.lora.enabled else (0, None)
    weight_bytes = MASTER_WEIGHT_BYTES if tc.precision == MASTER_PRECISION else dtype.itemsize
    require_training_fits(
        cfg.model, tc.batch_size * cfg.data.seq_len, 2 if lowp else 4, tc.device,
        weight_bytes=weight_bytes, adapters=adapters, trainable=trainable, held=source.nbytes,
    )  # fmt: skip
