"""bf16 parameters with fp32 master weights: ``train.precision=bf16-master``.

Why: under ``bf16`` (autocast over fp32 parameters) every forward casts every fp32 weight to bf16,
each step, and keeps the bf16 copies alive for backward. Storing the weights in bf16 removes those
casts (autocast finds nothing to cast). But AdamW cannot step bf16 weights directly: an update
smaller than half a bf16 ulp of its weight (``|Δw| < 2⁻⁹·|w|``, common late in a cosine schedule)
rounds away and training stalls. So the optimizer steps an fp32 **master** copy of every bf16
parameter, with fp32 moments, and writes the result back to the bf16 parameter (one rounding per
step): small updates accumulate in the master until they show in bf16.

Which parameters: every trainable floating parameter of the model is stored in bf16, except those
of routers (:class:`~moelab.moe.routers.base.Router`: router math is fp32 whatever the model's
dtype) and of modules marked ``KEEP_FP32`` (LoRA adapters), which stay fp32 and are stepped in
place (they are their own master). Buffers (router bias, RoPE frequencies) are not touched.

One step (:class:`MasterWeightAdamW`):
  1. backward fills ``p.grad`` (bf16, shape of ``p``);
  2. :meth:`~MasterWeightAdamW.accumulate_grads` adds ``p.grad.float()`` into ``master.grad``
     (fp32, same shape) and frees ``p.grad``; the trainer calls it after each micro-batch, so
     gradient accumulation sums in fp32;
  3. clipping reads the fp32 master gradients (:meth:`~MasterWeightAdamW.grad_params`);
  4. :meth:`~MasterWeightAdamW.step`: AdamW steps the masters, then ``p.copy_(master)``.

Memory per bf16 parameter: 2 B (bf16 weight) + 4 B (fp32 master) + 8 B (AdamW moments) = 14 B
held between steps, against 12 B for fp32 parameters under autocast; at the optimizer step add
the 4 B fp32 master gradient (the 2 B bf16 gradient is freed as it is moved), 18 B against 16 B.
With ``grad_accum`` > 1 a later micro-batch's bf16 gradients (2 B) sit beside the fp32 sums until
they are moved: 20 B at most. What it saves: autocast's bf16 copy of every weight matrix (2 B a
parameter, made each forward and kept for backward), and fp32 residual-stream activations.

Checkpoints: the masters are the model's weights. :meth:`~MasterWeightAdamW.masters_in_model`
points each bf16 parameter at its fp32 master for the duration of a save or a load, so
``model.safetensors`` holds the fp32 masters (evaluation, export and ``--init`` read full-precision
weights) and a resume loads them straight into the masters; :meth:`state_dict` holds the AdamW
state of the masters only, laid out as a plain AdamW over the same parameters would lay it out
(so a run may resume across ``fp32``/``bf16``/``bf16-master`` with ``--allow-config-change``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from moelab.config import TrainConfig
from moelab.moe.routers.base import Router
from moelab.train.optim import adamw_options, build_optimizer, fused_supported, param_groups

MASTER_PRECISION = "bf16-master"
LOW_DTYPE = torch.bfloat16
MASTER_WEIGHT_BYTES = 6  # per parameter: the bf16 weight (2 B) and its fp32 master (4 B), for memory checks


def fp32_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that stay fp32 under ``bf16-master``: those of routers and ``KEEP_FP32`` modules."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, Router) or getattr(module, "KEEP_FP32", False):
            keep.update(id(p) for p in module.parameters())
    return keep


class MasterWeightAdamW:
    """AdamW over fp32 masters of a model whose weights it stores in bf16 (see the module doc).

    Building it casts ``model``'s trainable fp32 parameters to bf16 in place (routers excepted); the
    fp32 tensors they held become the masters, so nothing is copied. ``groups`` are AdamW parameter
    groups over ``model``'s parameters (:func:`~moelab.train.optim.param_groups`); the inner AdamW gets
    the same groups with each bf16 parameter replaced by its master, and ``adamw`` (lr, betas, eps,
    fused, …) as they are. :attr:`param_groups` are the inner AdamW's, so ``set_lr`` works unchanged.
    """

    def __init__(self, model: nn.Module, groups: list[dict[str, Any]], **adamw: Any) -> None:
        keep = fp32_parameter_ids(model)
        self.pairs: list[tuple[nn.Parameter, Tensor]] = []  # (bf16 parameter, its fp32 master), same shape
        master_of: dict[int, Tensor] = {}
        for group in groups:
            for p in group["params"]:
                if id(p) in master_of or id(p) in keep or p.dtype != torch.float32:
                    continue
                master = p.detach().requires_grad_(True)  # the fp32 storage p held: no copy
                p.data = p.data.to(LOW_DTYPE)
                master_of[id(p)] = master
                self.pairs.append((p, master))
        inner_groups = [{**g, "params": [master_of.get(id(p), p) for p in g["params"]]} for g in groups]
        self.inner = torch.optim.AdamW(inner_groups, **adamw)

    @classmethod
    def for_training(cls, model: nn.Module, cfg: TrainConfig) -> MasterWeightAdamW:
        """The trainer's optimizer under ``bf16-master``: the groups, weight decay, betas, eps and fused
        choice of :func:`~moelab.train.optim.build_optimizer`, over masters."""
        fused = fused_supported(model)  # before the cast: the same answer as build_optimizer's
        return cls(model, param_groups(model, cfg.weight_decay), **adamw_options(cfg, fused))

    # ------------------------------------------------------------------ the optimizer interface

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner AdamW's groups (masters for bf16 parameters): their ``lr`` is what steps use."""
        return self.inner.param_groups

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        """The inner AdamW's per-tensor state (``exp_avg``/``exp_avg_sq`` fp32, shaped like each master)."""
        return self.inner.state

    @property
    def masters(self) -> list[Tensor]:
        """``[fp32 master]`` of each bf16 parameter, in :attr:`pairs` order."""
        return [m for _, m in self.pairs]

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move each bf16 parameter's gradient into its master's: ``master.grad += p.grad.float()``
        (``=`` when the master has none; both shaped like ``p``), then ``p.grad = None``, which frees the
        bf16 gradient. Idempotent; fp32 parameters (routers) keep theirs."""
        for p, master in self.pairs:
            if p.grad is None:
                continue
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

    def grad_params(self) -> list[Tensor]:
        """The tensors AdamW will step that hold a gradient (fp32 masters and fp32 parameters), after
        :meth:`accumulate_grads`: clip and measure the gradient norm on these."""
        self.accumulate_grads()
        return [p for g in self.inner.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the masters (fp32 gradients moved in first), then each bf16 parameter that had a
        gradient takes its master rounded to bf16."""
        self.accumulate_grads()
        stepped = [master.grad is not None for master in self.masters]
        self.inner.step()
        for (p, master), moved in zip(self.pairs, stepped):
            if moved:
                p.copy_(master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the bf16 parameters' gradients and the masters' (and the fp32 parameters')."""
        for p, _ in self.pairs:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner AdamW's state (fp32 moments and step of every parameter, masters' under bf16 ones).
        The masters themselves are the model's weights: save them with :meth:`masters_in_model`."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints

    @contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """Within the block each bf16 parameter holds its fp32 master's storage: a save writes the
        masters, a load writes into them. On exit the parameters are bf16 again, equal to their masters
        rounded (refreshed, so a load is seen)."""
        low = [p.data for p, _ in self.pairs]
        for p, master in self.pairs:
            p.data = master.detach()
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, master), data in zip(self.pairs, low):
                    p.data = data
                    p.copy_(master)


# ----------------------------------------------------------------------------- the trainer's entry points


def build_training_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW | MasterWeightAdamW:
    """The run's optimizer: :class:`MasterWeightAdamW` under ``train.precision=bf16-master`` (it casts
    ``model``'s weights to bf16), else :func:`~moelab.train.optim.build_optimizer`'s AdamW."""
    if cfg.precision == MASTER_PRECISION:
        return MasterWeightAdamW.for_training(model, cfg)
    return build_optimizer(model, cfg)


def grads_to_clip(optimizer: torch.optim.Optimizer | MasterWeightAdamW, model: nn.Module) -> list[Tensor]:
    """The gradients the step will apply, to clip and measure: the fp32 masters' under ``bf16-master``,
    else the model's parameters that have one."""
    if isinstance(optimizer, MasterWeightAdamW):
        return optimizer.grad_params()
    return [p for p in model.parameters() if p.grad is not None]


def checkpoint_weights(optimizer: torch.optim.Optimizer | MasterWeightAdamW) -> AbstractContextManager[None]:
    """Wrap a checkpoint save or load: under ``bf16-master`` the model's weights are its fp32 masters
    within the block (:meth:`MasterWeightAdamW.masters_in_model`); else nothing changes."""
    return optimizer.masters_in_model() if isinstance(optimizer, MasterWeightAdamW) else nullcontext()
