"""Running a study and re-scoring a committed one.

Every study obeys the same rules — the same data order and token budget across arms, ≥ 3 seeds,
a rule declared in its module before it runs, the verdict computed from that rule on the paired
per-seed numbers (never by hand) — so the machinery lives in a few shared modules, re-exported
here for the studies:

- :mod:`moelab.studies.result`: the catalog, the registries, :class:`StudyResult`, :class:`Scored`;
- :mod:`moelab.studies.arms`: the base run per budget, arms trained through ``run_all``;
- :mod:`moelab.studies.scoring`: :class:`ArmClaim` (a declared rule over arms) and its verdict;
- :mod:`moelab.studies.page`: ``docs/studies/NAME.{md,json}`` and the index.
"""

from __future__ import annotations

import datetime
import inspect
import json
import time
from pathlib import Path

from moelab.errors import UserError
from moelab.experiment.runs import threads_per_job
from moelab.stats import VERDICTS
from moelab.studies.arms import (
    base_run,
    check_budget,
    data_label,
    shared_corpus,
    summarise,
    train_arms,
    train_outcomes,
)
from moelab.studies.folder import claim_study_folder
from moelab.studies.page import BAR_METRICS, label_tables, write_index, write_study
from moelab.studies.result import (
    BUDGETS,
    CATALOG,
    SCORES,
    STUDIES,
    Scored,
    StudyResult,
    arm_summary,
    mean_std,
)
from moelab.studies.scoring import ArmClaim

__all__ = [
    "BAR_METRICS",
    "BUDGETS",
    "CATALOG",
    "SCORES",
    "STUDIES",
    "VERDICTS",
    "ArmClaim",
    "Scored",
    "StudyResult",
    "arm_summary",
    "base_run",
    "data_label",
    "label_tables",
    "mean_std",
    "rescore_study",
    "run_study",
    "shared_corpus",
    "summarise",
    "train_arms",
    "train_outcomes",
    "write_index",
    "write_study",
]

# Pages written before declared rules (no "rule" in their JSON) whose numbers cannot carry a verdict.
NOT_RESCORABLE = {
    "iso-flop": (
        "iso-flop cannot be re-scored: its committed numbers read the dense_long run's loss in the middle of a "
        "4x-longer cosine schedule, which is not the loss of a smaller budget; it must be re-run on the budget "
        "ladder (complete schedules), not re-scored"
    ),
}


def _check_name(name: str) -> None:
    if name not in CATALOG:
        raise UserError(f"unknown study {name!r}: see `moelab study --list`")
    if name not in STUDIES:
        raise UserError(f"study {name!r} is not implemented yet (see `moelab study --list`)")


def run_study(
    name: str,
    budget: str = "smoke",
    seeds: int = 3,
    out: Path | str = "runs/studies",
    docs: Path | str = "docs/studies",
    command: str = "",
    jobs: int = 1,
    overwrite: bool = False,
) -> StudyResult:
    """Run study ``name`` into ``out/NAME`` and write its page into ``docs``. ``jobs`` > 1 trains that
    many (arm, seed) runs side by side, each on ``torch.get_num_threads() // jobs`` threads; the
    numbers equal a sequential run with that many threads per run.

    ``out/NAME`` must be missing or empty, or (``overwrite``) hold nothing but an earlier run of the
    study, which is deleted: checked before any data is prepared (:mod:`moelab.studies.folder`)."""
    _check_name(name)
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    check_budget(budget)
    folder = claim_study_folder(Path(out) / name, overwrite=overwrite)
    study = STUDIES[name]
    kwargs = {"jobs": jobs} if "jobs" in inspect.signature(study).parameters else {}
    start = time.perf_counter()
    res = study(budget=budget, seeds=list(range(seeds)), out=folder, **kwargs)
    res.wall_s = round(time.perf_counter() - start, 1)
    if res.jobs is None:  # a study that ran otherwise (hybrid-inference times alone) has said so itself
        res.threads, res.jobs = threads_per_job(jobs), jobs
    res.command = command or f"moelab study {name} --budget {budget} --seeds {seeds}"
    write_study(res, Path(docs))
    return res


def rescore_study(name: str, docs: Path | str = "docs/studies", today: str | None = None) -> StudyResult:
    """Re-score ``docs/NAME.json`` with the study's declared rule (its ``score``) and rewrite
    NAME.md, NAME.json and the index; nothing is trained. The page keeps its numbers, command and
    wall time, and says when and from which verdict it was re-scored."""
    _check_name(name)
    if name not in SCORES:
        raise UserError(f"study {name!r} has no score function to re-score it with")
    path = Path(docs) / f"{name}.json"
    if not path.is_file():
        raise UserError(
            f"no committed result to re-score: {path} does not exist (run `moelab study {name}` first)"
        )
    try:
        res = StudyResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is not a study result ({e}): re-run the study instead") from e
    if name in NOT_RESCORABLE and not res.rule:
        raise UserError(NOT_RESCORABLE[name])
    previous = res.rescored or {"previous_verdict": res.verdict, "previous_reason": res.verdict_reason}
    res.apply(SCORES[name](res.arms, res.numbers))
    res.rescored = {
        "date": today or datetime.date.today().isoformat(),
        "previous_verdict": previous["previous_verdict"],
        "previous_reason": previous["previous_reason"],
    }
    write_study(res, Path(docs))
    return res
