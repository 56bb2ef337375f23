"""Refuse a model, or a training run, too big for the memory that is free, before allocating it.

Why: ``--set moe.num_experts=100000`` used to allocate until the machine swapped or the kernel
killed the process, and 10⁸ experts ended in an allocation traceback. The sizes are known from the
config alone (:mod:`moelab.model.sizes`), so the refusal is arithmetic and one line.

Where: :class:`~moelab.model.transformer.Transformer` and
:class:`~moelab.model.encoder_decoder.EncoderDecoder` call :func:`require_fits` before creating
a parameter, so every path that builds a model from a config passes it (train, compare, study,
convert, upcycle, moefy, checkpoint loading). It compares the weights' bytes (parameters × the
default dtype's size, on the default device) with :func:`moelab.hardware.available_memory`; a
model that fits pays for one read of /proc/meminfo. Where free memory cannot be known the check
is skipped. A model built on the ``meta`` device allocates nothing and is not checked there: the
streaming loaders (:mod:`moelab.model.materialize`) build on meta and call :func:`require_fits`
with the device and the dtype they will allocate in (a bf16 load counts 2 bytes a parameter, not 4). ``moelab train`` and ``compare`` also call :func:`require_training_fits` with the run's
micro-batch before any data is prepared: weights, gradients, AdamW moments and a lower bound on
activations.

Override: ``MOELAB_ALLOW_LARGE=1`` (the ``--allow-large`` flag of commands that build a model sets
it for the command), for swap, memory overcommit, or a machine whose free memory is misreported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from moelab.errors import UserError
from moelab.hardware import AvailableMemory, available_memory
from moelab.model.sizes import parameter_count, training_bytes

if TYPE_CHECKING:
    from moelab.model.sizes import AnyModelConfig

ALLOW_ENV = "MOELAB_ALLOW_LARGE"
OVERRIDE = f"set {ALLOW_ENV}=1 (or pass --allow-large) to try anyway"


class ModelTooLargeError(UserError):
    """A model or a training run needs more memory than is free; the message says how much of each."""


def allow_large() -> bool:
    """Whether ``MOELAB_ALLOW_LARGE`` is set to something other than empty or ``0``."""
    return os.environ.get(ALLOW_ENV, "").strip() not in ("", "0")


def gib(n: float) -> str:
    """Bytes with 3 significant digits in the largest binary unit below them (MiB … EiB), for messages."""
    for power, unit in ((60, "EiB"), (50, "PiB"), (40, "TiB"), (30, "GiB")):
        if n >= 2**power:
            return f"{n / 2**power:.3g} {unit}"
    return f"{n / 2**20:.3g} MiB"


def _free(device: torch.device | str) -> AvailableMemory | None:
    return None if allow_large() else available_memory(device)


def require_fits(
    cfg: AnyModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> None:
    """ModelTooLargeError when the weights of the model ``cfg`` builds exceed the free memory of
    ``device`` (default: torch's default device, where the builder allocates), at ``dtype``'s size
    per parameter (default: torch's default dtype, the one the builder allocates in)."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":  # shapes only: nothing is allocated
        return
    dtype = torch.get_default_dtype() if dtype is None else dtype
    params = parameter_count(cfg)
    need = params * dtype.itemsize
    free = _free(device) if need > 0 else None
    if free is None or need <= free.bytes:
        return
    raise ModelTooLargeError(
        f"the model has {params:,} parameters: {gib(need)} of {str(dtype).removeprefix('torch.')} weights, more than "
        f"the {gib(free.bytes)} free on {device} ({free.source}); shrink it (moe.num_experts, moe.expert_hidden, "
        f"d_model, n_layers, vocab_size) or {OVERRIDE}"
    )


def require_training_fits(
    cfg: AnyModelConfig,
    tokens: int,
    activation_bytes: int = 4,
    device: torch.device | str = "cpu",
    *,
    weight_bytes: int = 4,
    adapters: int = 0,
    trainable: int | None = None,
    held: int = 0,
) -> None:
    """ModelTooLargeError when training ``cfg`` on micro-batches of ``tokens`` tokens needs more than
    the free memory of ``device``, by :func:`moelab.model.sizes.training_bytes` (a lower bound; a LoRA
    run passes its base's ``weight_bytes``, its ``adapters`` and ``trainable`` counts). ``held``: bytes
    this process already holds that the run gives back as it starts (``--init`` weights), counted as free."""
    free = _free(device)
    if free is None:
        return
    need = training_bytes(cfg, tokens, activation_bytes, weight_bytes, adapters, trainable)
    if need.total <= free.bytes + held:
        return
    lora = "" if trainable is None else f", {trainable:,} of them trained"
    raise ModelTooLargeError(
        f"training this model needs at least {gib(need.total)} ({need.params:,} parameters{lora}: weights "
        f"{gib(need.weights)}, gradients {gib(need.gradients)}, AdamW moments {gib(need.optimizer)}; activations of "
        f"{tokens:,} tokens {gib(need.activations)}), more than the {gib(free.bytes + held)} free on {device} "
        f"({free.source}); shrink the model or train.batch_size / data.seq_len, fine-tune with LoRA "
        f"(train.lora.rank, train.lora.base_dtype=bf16), or {OVERRIDE}"
    )


__all__ = ["ALLOW_ENV", "ModelTooLargeError", "allow_large", "require_fits", "require_training_fits"]
