"""``moelab study``: claims about MoE measured with seeds, budgets and a computed verdict.

One file per study; each registers a function ``run(budget, seeds) -> StudyResult`` in
:data:`STUDIES`. :data:`CATALOG` lists every planned study (one line each) so that
``moelab study --list`` can say which exist; only registered ones are runnable.
"""

from __future__ import annotations

import importlib

from moelab.studies.base import CATALOG, STUDIES, StudyResult, run_study, verdict

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

__all__ = ["CATALOG", "STUDIES", "StudyResult", "run_study", "verdict"]
