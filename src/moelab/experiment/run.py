"""One training run, assembled in one place: config → data + tokenizer → model → Trainer → trained run.

Why: ``moelab train``, ``compare``, the budget ladder and every study must prepare data, pick the
tokenizer (a resumed run's, an ``--init`` source's, or a new one), build the model for the
objective and train it the same way. They all call :func:`train_run`, which hands back what was
trained *in memory* — the model, its validation split, its final evaluation and its logged
records — so that nothing downstream re-reads a checkpoint or rebuilds a corpus to look at it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moelab.calc import arch_from_config, flops_per_token
from moelab.checkpoint.folder import latest_checkpoint
from moelab.config import ModelConfig, RunConfig
from moelab.data.loader import PackedData
from moelab.data.prepare import PreparedData, prepare_data
from moelab.data.tokenizer import Tokenizer, load_tokenizer
from moelab.model.encoder_decoder import EncoderDecoder
from moelab.model.twins import ParamCount, count_params
from moelab.train.evaluation import EvalResult
from moelab.train.objective_step import objective_of, prepare_tokenizer
from moelab.train.run_folder import check_run_folder
from moelab.train.trainer import Trainer


def train_flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int, encoder_decoder: bool = False) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward).

    A decoder or encoder: ``moelab calc``'s count (every active matmul, the LM head, attention
    over ``seq_len`` keys), the same formula the studies use. An encoder–decoder (the ``span``
    objective), which calc does not describe: Kaplan's 6·(active non-embedding parameters +
    head) plus 6·layers·seq_len·d_model for attention.
    """
    if not encoder_decoder:
        return flops_per_token(arch_from_config(cfg), seq_len)["training"]
    return 6.0 * (active_params + cfg.d_model * cfg.vocab_size) + 6.0 * cfg.n_layers * seq_len * cfg.d_model


@dataclass
class RunRecord:
    """What a finished run reports, with or without its model (picklable): its folder, final evaluation,
    metrics.jsonl records, parameter counts, budget (tokens, steps, FLOPs per token) and cost."""

    run_dir: Path
    result: EvalResult
    records: list[dict[str, Any]]
    counts: ParamCount
    tokens: int
    steps: int
    flops_per_token: float
    flops_formula: str
    wall_s: float
    skipped_steps: int

    @property
    def train_flops(self) -> float:
        return self.flops_per_token * self.tokens

    def eval_curve(self) -> dict[str, list[float]]:
        """Steps, tokens, FLOPs and validation loss of every evaluation of the run, in order."""
        evals = [r for r in self.records if r.get("kind") == "eval"]
        return {
            "steps": [r["step"] for r in evals],
            "tokens": [float(r["tokens"]) for r in evals],
            "flops": [self.flops_per_token * r["tokens"] for r in evals],
            "val_loss": [float(r["val_loss"]) for r in evals],
        }


@dataclass
class TrainedRun(RunRecord):
    """What one run produced, in memory: its :class:`RunRecord` and the trained model.

    ``model`` is the trained module (eval mode), ``data`` the prepared corpus it was trained on (``val``
    is its held-out split), ``tokenizer`` its tokenizer. ``trainer`` is kept for callers that need its
    state (optimizer, balancer, validation batches).
    """

    cfg: RunConfig  # as trained: vocab size and objective's attention set
    model: nn.Module
    tokenizer: Tokenizer
    data: PreparedData
    trainer: Trainer

    @property
    def val(self) -> PackedData:
        return self.data.splits.val

    @property
    def seed(self) -> int:
        return self.cfg.train.seed


def prepare(cfg: RunConfig, tokenizer: Tokenizer | None = None) -> tuple[RunConfig, PreparedData]:
    """Load, tokenise and split ``cfg.data`` once (shared by every run of a comparison), with the
    objective's special tokens added before any model reads the vocabulary size."""
    cfg, data = prepare_data(cfg, tokenizer=tokenizer)
    prepare_tokenizer(data.tokenizer, objective_of(cfg))
    return cfg, data


def resume_tokenizer(run_dir: str | Path, init: Any = None) -> Tokenizer | None:
    """The tokenizer a run must keep: its newest checkpoint's when it resumes, else an ``--init``
    source's when it has one; None means train or load one from ``cfg.data``."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return load_tokenizer(ckpt / "tokenizer.json")
    return getattr(init, "tokenizer", None)


def train_run(
    cfg: RunConfig,
    run_dir: str | Path,
    data: PreparedData | None = None,
    *,
    init: Any = None,
    resume: bool = False,
    stop_at: int | None = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> TrainedRun:
    """Train ``cfg`` into ``run_dir`` and return the :class:`TrainedRun`.

    ``data`` shares one prepared corpus between runs (it must come from :func:`prepare`); without it
    the corpus is prepared here, with the resumed checkpoint's or ``init``'s tokenizer when there is
    one. ``init`` (``moelab.train.init.InitSource``) sets the starting weights of a fresh run.

    ``run_dir`` follows :mod:`moelab.train.run_folder`, checked before the corpus is prepared: a fresh
    run needs it missing or empty (``overwrite``: it may hold an earlier run, which is deleted);
    ``resume`` continues its newest checkpoint, with a changed ``train`` config only when
    ``allow_config_change``.
    """
    check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    if data is None:
        tokenizer = resume_tokenizer(run_dir, init) if resume else getattr(init, "tokenizer", None)
        cfg, data = prepare_data(cfg, tokenizer=tokenizer)  # the Trainer adds the objective's tokens after --init's check
    if init is not None:
        from moelab.train.init import check_vocab

        check_vocab(init, data.tokenizer)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, data=data, init=init)  # a resume then replaces init's weights by its own
    result = trainer.train(resume=resume, stop_at=stop_at, overwrite=overwrite, allow_config_change=allow_config_change)
    return finished_run(trainer, result, time.perf_counter() - t0)


def finished_run(trainer: Trainer, result: EvalResult, wall_s: float) -> TrainedRun:
    """The :class:`TrainedRun` of a trainer that has just trained."""
    counts = count_params(trainer.model)
    encoder_decoder = isinstance(trainer.model, EncoderDecoder)
    fpt = train_flops_per_token(trainer.cfg.model, counts.active, trainer.cfg.data.seq_len, encoder_decoder)
    trainer.model.eval()
    return TrainedRun(
        cfg=trainer.cfg,
        run_dir=trainer.run_dir,
        model=trainer.model,
        tokenizer=trainer.data.tokenizer,
        data=trainer.data,
        result=result,
        records=list(trainer.history),
        counts=counts,
        tokens=trainer.tokens_seen,
        steps=trainer.step,
        flops_per_token=fpt,
        flops_formula="kaplan-6N (encoder-decoder)" if encoder_decoder else "calc",
        wall_s=wall_s,
        skipped_steps=trainer.bad_total,
        trainer=trainer,
    )
