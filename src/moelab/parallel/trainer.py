"""`moelab train` under torchrun: the Trainer's loop on the parallel/ library functions.

Why a subclass next to :class:`~moelab.train.trainer.Trainer` rather than branches inside it:
the single-process path stays byte-for-byte what it was; this file only swaps the step, the
checkpoint I/O and who logs.

Semantics (docs/distributed.md):
- ``train.batch_size`` is the **global** batch (sequences per optimizer step). Every rank draws
  the same block indices from the trainer's own sampler (same seed) and keeps its rows
  ``shard_rows`` of them: the shards are disjoint and together are exactly the batch one
  process would draw. The learning rate schedule is that of the global batch.
- ``train.grad_accum`` global micro-batches per step, each sharded the same way; one gradient
  sync per step. bf16 autocast as in one process.
- Losses are reduced over ranks (LM loss token-mean over the global batch; router aux loss mean
  over the per-shard aux losses), and routing statistics are those of the global batch (loads
  summed over ranks), so logged metrics, health checks, the Balancer's bias updates and the
  skip decision for a non-finite step are identical on every rank.
- Rank 0 alone writes metrics, the progress bar and checkpoints. Checkpoints are gathered to
  the ordinary safetensors format, so they load at any world size (including 1).

Legend: W world size, B global batch (sequences).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moelab.checkpoint.folder import checkpoint_name, prune_checkpoints
from moelab.config import RunConfig
from moelab.data.prepare import PreparedData
from moelab.errors import UserError
from moelab.moe.balancing import Balancer
from moelab.parallel.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from moelab.parallel.expert_parallel import shard_experts
from moelab.parallel.mesh import ParallelLayout
from moelab.parallel.train_step import accumulate_step, shard_rows
from moelab.parallel.wrap import build_data_parallel
from moelab.train import objective_step
from moelab.train.init import InitSource
from moelab.train.optim import build_optimizer, lr_at, set_lr
from moelab.train.trainer import GRAD_NORM, LOSS, Trainer, autocast


class DistributedTrainer(Trainer):
    """A :class:`Trainer` whose steps run on ``layout`` (dp × ep ranks); every rank builds one.

    ``dp_mode`` names a :data:`moelab.parallel.DATA_PARALLEL` entry (``manual``/``ddp``).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        layout: ParallelLayout,
        data: PreparedData | None = None,
        dp_mode: str = "manual",
        init: InitSource | None = None,
    ) -> None:
        if cfg.train.lora.enabled:
            raise UserError("train.lora is not supported under torchrun yet: fine-tune with LoRA in one process")
        if cfg.train.precision == "bf16-master":
            raise UserError(
                "train.precision=bf16-master is not supported under torchrun yet: use train.precision=bf16 "
                "(autocast over fp32 weights), or train with bf16-master in one process"
            )
        super().__init__(cfg, run_dir, data=data, init=init)  # every rank loads the full weights; _install shards
        tc = self.cfg.train
        if not objective_step.is_plain_causal(self.objective):
            raise UserError(
                f"train.objective={tc.objective} is not supported under torchrun yet: train it in one process "
                "(the torchrun step feeds next-token batches)"
            )
        if self.model.cfg.moe is None and layout.ep > 1:
            raise UserError(f"--ep {layout.ep} needs an MoE model: this config is dense")
        if dp_mode == "fsdp":
            raise UserError("--dp fsdp is not supported by moelab train yet: use --dp manual or --dp ddp")
        shard_rows(tc.batch_size, layout)  # refuse a batch that does not split before any work
        self.layout = layout
        self.data_parallel = build_data_parallel(dp_mode, layout)
        self._optimizer_factory = lambda m: build_optimizer(m, tc)
        self._install(self.model, None)

    def _install(self, model, optimizer) -> None:
        """Shard ``model``'s experts over ep (unless done), wrap for dp, rebuild the dependants."""
        if optimizer is None:
            self.comm = shard_experts(model, self.layout.ep_group) if self.model.cfg.moe is not None else None
            optimizer = self._optimizer_factory(model)
        else:
            self.comm = None
        self.model, self.optimizer = model, optimizer
        self.balancer = Balancer(model)
        self.wrapped = self.data_parallel.wrap(model)

    # ------------------------------------------------------------------ state

    def save(self) -> Path:
        path = save_sharded_checkpoint(
            self.run_dir / "checkpoints" / checkpoint_name(self.step),
            self.model,
            self.optimizer,
            self.cfg,
            self.data.tokenizer,
            self.layout,
            self._optimizer_factory,
            self.train_state(),
        )
        if self.layout.env.is_main:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_last, newest=path)
        return path

    def resume(self, allow_config_change: bool = False) -> bool:
        """Restore the newest checkpoint (written at any world size) with this rank's experts."""
        ckpt = self.checkpoint_to_resume(allow_config_change)
        if ckpt is None:
            return False
        model, optimizer, state, _ = load_sharded_checkpoint(ckpt, self.layout, self._optimizer_factory)
        self._install(model, optimizer)
        self._load_train_state(state)
        return True

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, Any]:
        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        set_lr(self.optimizer, lr)
        rows = shard_rows(tc.batch_size, self.layout)
        dev = self.layout.env.device
        micro = []
        for _ in range(tc.grad_accum):  # the same global micro-batches as one process draws
            batch = self.train_split.batch(self.sampler.next_indices(tc.batch_size))  # same on every rank
            self.tokens_seen += batch.input_ids.numel()
            micro.append((batch.input_ids[rows].to(dev), batch.labels[rows].to(dev)))
        m = accumulate_step(
            self.wrapped,
            self.data_parallel,
            self.optimizer,
            micro,
            self.layout,
            comm=self.comm,
            grad_clip=tc.grad_clip,
            autocast=lambda: autocast(dev, self.bf16),
            before_step=self.balancer.update,
        )
        self.step += 1
        self.count_step((LOSS if not math.isfinite(m.loss + m.aux_loss) else GRAD_NORM) if m.skipped else None)
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "loss": m.loss + m.aux_loss,
            "lm_loss": m.loss,
            "aux_loss": m.aux_loss,
            "lr": lr,
            "grad_norm": m.grad_norm,
            "skipped": m.skipped,
            "bad_steps": self.bad_total,
            "tokens": self.tokens_seen,
            "a2a_bytes": m.a2a_bytes,
            "world_size": self.layout.world_size,
        }
        rec.update(self.routing_metrics(m.routing))  # global-batch statistics: the same on every rank
        return rec

    @property
    def is_main(self) -> bool:
        return self.layout.env.is_main
