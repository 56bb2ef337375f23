"""The training loop: one optimizer step = ``grad_accum`` micro-batches, then balance, clip, step.

Per step: for each micro-batch, forward (with ``return_routing=True`` when the model has MoE
layers) under optional bf16 autocast, ``out.total_loss`` (LM loss + weighted aux/z losses)
divided by ``grad_accum``, backward; then :class:`RoutingStats` of the step go to
``Balancer.update`` (between backward and the optimizer step, DESIGN.md), gradients are
clipped and AdamW steps with the warmup+cosine learning rate of that step. Under
``train.precision=bf16-master`` the weights are bf16 and AdamW steps fp32 masters
(:mod:`moelab.train.master_weights`): gradients move to the masters after each micro-batch,
clipping reads the fp32 gradients, and checkpoints hold the masters.

A non-finite loss or gradient norm skips the step (no update, data still consumed, counted);
``train.max_bad_steps`` in a row stop the run with a :class:`TrainingDiverged` error that says
what was not finite (the loss, the gradient norm) and at which steps.

The run folder follows :mod:`moelab.train.run_folder`: a fresh run never starts over an earlier
one (``overwrite`` deletes the earlier run's own files first), and a resume checks the saved
config against the new one (:mod:`moelab.train.resume_config`). Keep-last never deletes the
checkpoint just written.

Determinism: the seed fixes model init (``torch.manual_seed(train.seed)`` before building the
model), the sampler's permutation and dropout; the RNG, optimizer and sampler state go into
every checkpoint, so a resumed run continues bit for bit on CPU.
"""

from __future__ import annotations

import base64
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint.folder import checkpoint_name, latest_checkpoint, prune_checkpoints, read_run_config
from moelab.checkpoint.state import load_training_state, save_checkpoint
from moelab.config import RunConfig
from moelab.data.loader import Batch, Sampler, eval_batches, repeated_subset
from moelab.data.prepare import PreparedData, prepare_data
from moelab.errors import UserError
from moelab.model.lora import apply_lora, base_dtype
from moelab.model.materialize import cast_on_meta
from moelab.moe.balancing import Balancer
from moelab.moe.health import RouterHealth
from moelab.moe.stats import RoutingStats
from moelab.moe.validate import check_model_config
from moelab.objectives.metrics import token_bytes
from moelab.train import objective_step
from moelab.train.evaluation import EvalResult, autocast, evaluate, evaluate_with_objective, resolve_precision
from moelab.train.init import InitSource, init_model
from moelab.train.logging import MetricsLogger, Progress, read_metrics
from moelab.train.master_weights import (
    MasterWeightAdamW,
    build_training_optimizer,
    checkpoint_weights,
    grads_to_clip,
)
from moelab.train.optim import lr_at, set_lr
from moelab.train.resume_config import ConfigChange, check_resume_config
from moelab.train.run_folder import check_run_folder, start_run_folder


class RouterHealthWarning(UserWarning):
    """A router collapsed or experts died (see :class:`moelab.moe.health.RouterHealth`)."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm was not finite for ``train.max_bad_steps`` steps in a row."""


LOSS, GRAD_NORM = "loss", "gradient norm"  # what made a step bad


class Trainer:
    """Trains one model of a :class:`RunConfig` into ``run_dir`` (metrics, checkpoints).

    ``data`` lets several runs share one prepared corpus (``moelab compare``); without it the
    trainer prepares ``cfg.data`` itself. ``model.vocab_size`` is set to the tokenizer's. ``init``
    (``train --init``) gives the starting weights; the trainer takes them over (:func:`init_model`).
    """

    def __init__(
        self, cfg: RunConfig, run_dir: str | Path, data: PreparedData | None = None, init: InitSource | None = None
    ) -> None:
        if data is None:
            cfg, data = prepare_data(cfg)
        self.objective = objective_step.objective_of(cfg)
        objective_step.prepare_tokenizer(data.tokenizer, self.objective)  # before the vocab size is read
        self.token_bytes_V = token_bytes(data.tokenizer)  # [V] UTF-8 bytes per token, for bits per byte
        model_cfg = objective_step.model_config_for(check_model_config(cfg.model), self.objective)  # saved canonical
        vocab = data.tokenizer.vocab_size  # --init: the source's rows, padded beyond the tokenizer's or not
        vocab = vocab if init is None else max(vocab, init.model_cfg.vocab_size)
        cfg = replace(cfg, model=replace(model_cfg, vocab_size=vocab))
        self.cfg, self.data = cfg, data
        self.run_dir = Path(run_dir)
        tc = cfg.train
        self.device = torch.device(tc.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available: use train.device=cpu")
        self.bf16 = resolve_precision(tc.precision, self.device)
        torch.manual_seed(tc.seed)
        self.model = self._build_model(init)
        self.objective_rng = torch.Generator().manual_seed(tc.seed)  # masks, spans, prefixes
        self.optimizer = build_training_optimizer(self.model, tc)  # bf16-master: casts the weights to bf16
        self.balancer = Balancer(self.model)
        self.health = RouterHealth(cfg.model.moe) if cfg.model.moe is not None else None
        self.train_split = repeated_subset(data.splits.train, cfg.data.train_fraction)
        self.sampler = Sampler(self.train_split.num_blocks, seed=tc.seed)
        self.val_batches = eval_batches(data.splits.val, tc.batch_size, tc.eval_batches)
        self.step = 0
        self.bad_total = 0
        self.bad_in_a_row = 0
        self.bad_streak: list[tuple[int, str]] = []  # (step, what was not finite) of the current bad steps
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []  # every record logged this run (metrics.jsonl in memory)
        self.opened = False  # the run folder was claimed or resumed by an earlier train() of this trainer
        self.config_changes: list[ConfigChange] = []  # accepted on resume (--allow-config-change), for the report

    def _build_model(self, init: InitSource | None) -> torch.nn.Module:
        """The run's model on its device: random (seeded) or ``init``'s weights, in :func:`base_dtype`
        (fp32, or a LoRA run's frozen base in bf16/fp16), with LoRA adapters when ``train.lora`` is on."""
        tc = self.cfg.train
        dtype = base_dtype(tc.lora)
        build = lambda: objective_step.build_model(self.cfg.model, self.objective)  # noqa: E731
        if init is not None:
            model = init_model(build, init, dtype, self.device)
        else:
            model = build().to(self.device)
            if dtype != torch.float32:
                cast_on_meta(model, dtype)  # the same policy on real tensors: routers stay fp32
        if tc.lora.enabled:  # before the optimizer: it holds only the adapters (and a trained router)
            apply_lora(model, tc.lora)
        return model

    # ------------------------------------------------------------------ state

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "bad_total": self.bad_total,
            "bad_in_a_row": self.bad_in_a_row,
            "tokens_seen": self.tokens_seen,
            "objective_rng": base64.b64encode(self.objective_rng.get_state().numpy().tobytes()).decode("ascii"),
        }

    def _load_train_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.bad_total, self.bad_in_a_row = state["bad_total"], state["bad_in_a_row"]
        self.tokens_seen = state["tokens_seen"]
        if "objective_rng" in state:  # absent in checkpoints written before objectives existed
            raw = bytearray(base64.b64decode(state["objective_rng"]))
            self.objective_rng.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())

    def save(self) -> Path:
        with checkpoint_weights(self.optimizer):  # bf16-master: the fp32 masters are the checkpoint's weights
            path = save_checkpoint(
                self.run_dir / "checkpoints" / checkpoint_name(self.step),
                self.model,
                self.cfg,
                self.data.tokenizer,
                self.optimizer,
                self.train_state(),
            )
        prune_checkpoints(self.run_dir, self.cfg.train.keep_last, newest=path)
        return path

    def checkpoint_to_resume(self, allow_config_change: bool = False) -> Path | None:
        """The newest complete checkpoint of ``run_dir`` (None when there is none), after checking its
        config against this run's (:func:`~moelab.train.resume_config.check_resume_config`); the changes
        accepted go to :attr:`config_changes`."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return None
        self.config_changes = check_resume_config(ckpt, read_run_config(ckpt), self.cfg, allow_config_change)
        return ckpt

    def resume(self, allow_config_change: bool = False) -> bool:
        """Restore the newest complete checkpoint of ``run_dir``; False when there is none."""
        ckpt = self.checkpoint_to_resume(allow_config_change)
        if ckpt is None:
            return False
        with checkpoint_weights(self.optimizer):  # bf16-master: the saved fp32 weights go into the masters
            state = load_training_state(ckpt, self.model, self.optimizer)
        self._load_train_state(state)
        return True

    def open_run(self, resume: bool = False, overwrite: bool = False, allow_config_change: bool = False) -> bool:
        """Resume from ``run_dir`` or claim it for a fresh run (:mod:`moelab.train.run_folder`); True when resumed.

        Every rank resumes; only the main process checks and clears the folder: it alone writes there, and
        another rank looking could take the main process's first files for an earlier run.
        """
        if self.is_main:
            check_run_folder(self.run_dir, resume=resume, overwrite=overwrite)  # also refuses both flags at once
        resumed = self.resume(allow_config_change) if resume else False
        if not resumed and self.is_main:
            start_run_folder(self.run_dir, overwrite=overwrite, resume_asked=resume)
        self.opened = True
        return resumed

    # ------------------------------------------------------------------ loop

    def _micro_step(self, batch: Batch, scale: float) -> tuple[torch.Tensor, Any]:
        has_moe = bool(self.model.moe_layers)
        with autocast(self.device, self.bf16):
            out = objective_step.forward(
                self.model, self.objective, batch, self.data.tokenizer, self.objective_rng, self.device, has_moe
            )
        loss = out.total_loss
        if torch.isfinite(loss):
            (loss * scale).backward()
            if isinstance(self.optimizer, MasterWeightAdamW):  # sum the micro-batches' gradients in fp32
                self.optimizer.accumulate_grads()
        return loss.detach(), out

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns the scalars to log."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        losses, lm, aux_vals, stats = [], [], {}, []
        finite = True
        for _ in range(tc.grad_accum):
            batch = self.train_split.batch(self.sampler.next_indices(tc.batch_size))
            self.tokens_seen += batch.input_ids.numel()
            loss, out = self._micro_step(batch, 1.0 / tc.grad_accum)
            finite = finite and bool(torch.isfinite(loss))
            losses.append(float(loss))
            lm.append(float(out.loss.detach()))
            for k, v in out.aux.items():
                aux_vals.setdefault(k, []).append(float(v.detach()))
            if out.routing:
                stats.append(RoutingStats.from_routing(out.routing))
        grad_norm = float("nan")
        routing = sum(stats[1:], stats[0]) if stats else RoutingStats({})
        bad = None if finite else LOSS
        if finite:
            self.balancer.update(routing)
            params = grads_to_clip(self.optimizer, self.model)  # bf16-master: the fp32 master gradients
            if tc.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            finite = math.isfinite(grad_norm)
            bad = None if finite else GRAD_NORM
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.count_step(bad)
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "loss": sum(losses) / len(losses),
            "lm_loss": sum(lm) / len(lm),
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not finite,
            "bad_steps": self.bad_total,
            "tokens": self.tokens_seen,
        }
        rec.update({k: sum(v) / len(v) for k, v in aux_vals.items()})
        rec.update(self.routing_metrics(routing))
        return rec

    def routing_metrics(self, routing: RoutingStats) -> dict[str, Any]:
        """The step's routing statistics and router-health metrics for its log record (empty for a
        dense model); one warning per layer on collapse or dead experts, from the main process."""
        if not routing.layers:
            return {}
        out = routing.summary()
        if self.health is not None:
            out.update(self.health.metrics(routing))
            for message in self.health.observe(self.step, routing):
                if self.is_main:
                    warnings.warn(message, RouterHealthWarning, stacklevel=3)
        return out

    def count_step(self, bad: str | None) -> None:
        """Count the step just taken (``self.step``): ``bad`` names what was not finite, None for a good step."""
        if bad is None:
            self.bad_in_a_row, self.bad_streak = 0, []
            return
        self.bad_total += 1
        self.bad_in_a_row += 1
        self.bad_streak.append((self.step, bad))

    def check_diverged(self) -> None:
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(diverged_message(self.bad_streak, self.bad_in_a_row, self.step, self.bad_total))

    def evaluate(self) -> EvalResult:
        if objective_step.is_plain_causal(self.objective):
            return evaluate(
                self.model, self.val_batches, self.data.splits.val.label_names, self.bf16, token_bytes_V=self.token_bytes_V
            )
        return evaluate_with_objective(
            self.model, self.val_batches, self.objective, self.data.tokenizer, self.bf16, self.token_bytes_V
        )

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, the progress bar and checkpoint files (rank 0 under torchrun)."""
        return True

    def train(
        self,
        resume: bool = False,
        stop_at: int | None = None,
        *,
        overwrite: bool = False,
        allow_config_change: bool = False,
    ) -> EvalResult:
        """Train to ``train.steps`` (or stop early at ``stop_at`` with a checkpoint); return the final evaluation.

        The first call resumes or claims ``run_dir`` (:meth:`open_run`: ``resume``, ``overwrite``,
        ``allow_config_change``); a later call on the same trainer goes on from where it stopped and
        appends to its log. Under torchrun every rank runs this loop (steps, evaluation and saving
        are collective); only :attr:`is_main` logs and shows progress.
        """
        tc = self.cfg.train
        going_on = self.opened
        resumed = False if going_on else self.open_run(resume, overwrite, allow_config_change)
        end = tc.steps if stop_at is None else min(stop_at, tc.steps)
        logger: MetricsLogger | _Silent = _Silent()
        progress: Progress | _Silent = _Silent()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            keep = resumed or going_on
            logger = MetricsLogger(self.run_dir, tc.tensorboard, resume_step=self.step if keep else None)
            progress = Progress(end, self.step, self.run_dir.name, tc.progress)
            if not going_on:
                self.history = read_metrics(self.run_dir) if resumed else []
        self.model.train()
        train_time, tok0 = 0.0, self.tokens_seen
        result: EvalResult | None = None
        try:
            while self.step < end:
                t0 = time.perf_counter()
                rec = self.train_step()
                train_time += time.perf_counter() - t0
                if self.step % tc.log_every == 0 or self.step == end or rec.get("skipped"):
                    rec["tokens_per_s"] = (self.tokens_seen - tok0) / train_time if train_time > 0 else 0.0
                    rec["train_time_s"] = train_time
                    logger.log(rec)
                    if self.is_main:
                        self.history.append(rec)
                self.check_diverged()
                progress.update(self.step, f"loss {rec['loss']:.3f}")
                if (tc.eval_every and self.step % tc.eval_every == 0) or self.step == end:
                    result = self.evaluate()
                    rec = eval_record(self.step, self.tokens_seen, result, schedule_steps=tc.steps)
                    logger.log(rec)
                    if self.is_main:
                        self.history.append(rec)
                if tc.save_every and self.step % tc.save_every == 0 and self.step != end:
                    self.save()
            if result is None:
                result = self.evaluate()
            self.save()
        finally:
            progress.close()
            logger.close()
        return result


class _Silent:
    """Logger and progress bar of a rank that does not write (every call does nothing)."""

    def log(self, *args: Any, **kwargs: Any) -> None: ...

    def update(self, *args: Any, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def diverged_message(streak: list[tuple[int, str]], in_a_row: int, step: int, total: int) -> str:
    """Why training stopped: what was not finite (the loss, the gradient norm) and at which steps.

    ``streak`` holds ``(step, what)`` of the bad steps in a row seen by this process (a resumed run may
    have begun its streak before it started).
    """
    steps_of: dict[str, list[int]] = {}
    for s, what in streak:
        steps_of.setdefault(what, []).append(s)

    def at(steps: list[int]) -> str:
        return f"step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}"

    if len(steps_of) == 1:
        what, steps = next(iter(steps_of.items()))
        subject, where = f"the {what}", at(steps)
    else:
        subject = "the loss or the gradient norm"
        where = "; ".join(f"{what} at {at(steps)}" for what, steps in steps_of.items()) or f"step {step}"
    return (
        f"{subject} was not finite for {in_a_row} steps in a row ({where}; {total} skipped in all): "
        "lower train.lr, raise train.warmup_steps or use train.precision=fp32"
    )


def eval_record(step: int, tokens: int, r: EvalResult, schedule_steps: int | None = None) -> dict[str, Any]:
    """The ``eval`` line of metrics.jsonl. ``schedule_steps`` is the step at which the run's learning-rate
    schedule ends: a loss with ``step < schedule_steps`` was read mid-schedule and is not the loss of a
    run of ``step`` steps (``moelab.experiment.ladder`` refuses it as a budget point)."""
    return {
        "kind": "eval",
        "step": step,
        "tokens": tokens,
        "schedule_steps": schedule_steps,
        "val_loss": r.loss,
        "val_ppl": r.ppl,
        "val_tokens": r.tokens,
        "val_loss_by": r.loss_by,
        "val_bpb": r.bpb,
        "val_bpb_by": r.bpb_by,
        "val_documents": r.documents,
        "expert_load": {str(k): v for k, v in r.expert_load.items()},
        "objective": r.objective,
        "val_metrics": r.metrics,
    }

