"""``moelab train`` under torchrun (docs/distributed.md): data parallel, expert parallel, one line on failure.

The same assembly as :func:`moelab.experiment.run.train_run` (resumed or ``--init`` tokenizer, prepared
data, the model's starting weights), with the process group, the ``dp × ep`` layout and the
:class:`~moelab.parallel.trainer.DistributedTrainer` around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.config import RunConfig
from moelab.data.prepare import prepare_data
from moelab.errors import UserError
from moelab.experiment.run import resume_tokenizer
from moelab.train.evaluation import EvalResult
from moelab.train.run_folder import check_run_folder


def train_distributed(
    cfg: RunConfig,
    out: str | Path,
    ep: int = 1,
    dp_mode: str = "manual",
    resume: bool = False,
    stop_at: int | None = None,
    init: Any = None,
    report: Any = print,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> EvalResult:
    """Train ``cfg`` on every rank of a torchrun job; rank 0 reports the result through ``report``.

    ``out`` follows the same rule as one process (:func:`moelab.experiment.run.train_run`), checked before
    the data is prepared, claimed (and, with ``overwrite``, cleared) by rank 0 alone.
    """
    from moelab.parallel import build_layout, fail_together, init_distributed, launched_by_torchrun, shutdown
    from moelab.parallel.trainer import DistributedTrainer

    if not launched_by_torchrun():
        raise UserError(f"--ep {ep} needs several processes: launch with torchrun --nproc-per-node N -m moelab train ...")
    env = init_distributed()
    with fail_together(env):
        if env.is_main:  # rank 0 alone: another rank could see rank 0's first files and take them for an old run
            check_run_folder(out, resume=resume, overwrite=overwrite)
        num_experts = cfg.model.moe.num_experts if cfg.model.moe is not None else None
        layout = build_layout(env, ep=ep, num_experts=num_experts)
        tokenizer = resume_tokenizer(out, init) if resume else getattr(init, "tokenizer", None)
        cfg, data = prepare_data(cfg, tokenizer=tokenizer)
        if init is not None:
            from moelab.train.init import check_vocab

            check_vocab(init, data.tokenizer)
        # --init weights go into the full model before its experts are sharded over ep (a resume replaces them)
        trainer = DistributedTrainer(cfg, out, layout, data=data, dp_mode=dp_mode, init=init)
        result = trainer.train(resume=resume, stop_at=stop_at, overwrite=overwrite, allow_config_change=allow_config_change)
        if env.is_main:
            if trainer.config_changes:
                report(f"resumed with a changed config: {', '.join(map(str, trainer.config_changes))}")
            report(
                f"step {trainer.step}: val loss {result.loss:.4f} (ppl {result.ppl:.2f}) on {env.world_size} ranks "
                f"(dp {layout.dp}, ep {layout.ep}); checkpoints in {out}/checkpoints"
            )
    shutdown()
    return result
