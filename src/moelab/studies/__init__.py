"""``moelab study``: claims about MoE measured with seeds, budgets and a computed verdict.

One file per study; each declares its claim's rule at top level (before anything runs), registers
``run(budget, seeds, out, jobs) -> StudyResult`` in :data:`STUDIES` and a pure
``score(arms, numbers) -> Scored`` in :data:`SCORES` (the verdict from stored per-seed numbers,
so ``moelab study NAME --rescore`` needs no training). :data:`CATALOG` lists every planned study
(one line each) so that ``moelab study --list`` can say which exist; only registered ones run.
"""

from __future__ import annotations

import importlib

from moelab.studies.base import CATALOG, SCORES, STUDIES, StudyResult, rescore_study, run_study

_MODULES = (
    "capacity",
    "routers",
    "placement",
    "granularity",
    "enc_dec_specialisation",
    "specialisation",
    "gradient_conflict",
    "iso_flop",
    "sqrt_rule",
    "data_hunger",
    "sparsity",
    "swarm",
    "hybrid_inference",
)
for _m in _MODULES:
    importlib.import_module(f"moelab.studies.{_m}")

__all__ = ["CATALOG", "SCORES", "STUDIES", "StudyResult", "rescore_study", "run_study"]
