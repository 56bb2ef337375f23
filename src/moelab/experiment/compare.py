"""``moelab compare``: an MoE and its dense twins over seeds, same data, same budget → a paired verdict.

Why this is the main job: an MoE claim is only meaningful against a dense model that spends the
same compute per token (iso-active twin) or holds the same parameters (iso-total twin), and only
believable with its seed-to-seed spread. For every seed, every model is trained on the same
prepared token blocks in the same order (the sampler is seeded by the run's seed), from that seed,
for the same number of steps, and evaluated on the same validation batches; so the MoE and a twin
of one seed form a *pair*, and the answer is the paired difference MoE − twin with its 95% interval
over seeds, judged by :data:`COMPARE_RULE` (declared here, before any run).

Each MoE is analysed where it was trained, in memory, on the run's own validation split (routing
load, specialisation against its untrained router, drops; gradient conflict and FFN sparsity of the
dense twin): nothing is re-read from disk and no training document is traced.

Output in ``OUT/``: ``MODEL/seedS/`` run folders (metrics.jsonl, checkpoints), ``analysis/``,
``summary.json`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from moelab.config import ModelConfig, RunConfig, to_dict
from moelab.errors import UserError
from moelab.experiment.run import TrainedRun, prepare
from moelab.experiment.runs import RunOutcome, RunSpec, default_jobs, run_all, threads_per_job
from moelab.hardware import describe
from moelab.model.twins import dense_twin
from moelab.stats import Rule, decide, paired_difference, t_interval
from moelab.train.objective_step import is_plain_causal, objective_of

# The claim compare tests, fixed before it runs: the MoE reaches a lower validation loss than its twin,
# by at least 0.01 nats/token (smaller gaps move with the optimizer's rounding: README), paired over seeds.
COMPARE_RULE = Rule(metric="val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True, unit="nats/token")

# The analysis must cost seconds next to minutes of training.
ANALYSIS_BUDGET = dict(max_tokens=16_384, drop_tokens=4_096, conflict_batches=2, n_shuffle=10, n_boot=10)


def compare_models(cfg: RunConfig, iso_total: bool = False) -> dict[str, ModelConfig]:
    """The models a compare trains: the MoE, its iso-active twin, and optionally its iso-total twin."""
    if cfg.model.moe is None:
        raise UserError("compare needs an MoE model: model.moe is null (try --preset tiny)")
    models = {"moe": cfg.model, "dense_iso_active": dense_twin(cfg.model, "iso_active")}
    if iso_total:
        models["dense_iso_total"] = dense_twin(cfg.model, "iso_total")
    return models


def analysis_probe(run: TrainedRun, role: str, full: bool, out: str) -> dict[str, Any]:
    """The routing analysis of one trained run, in the process that trained it (a :class:`RunSpec` probe).

    ``role`` ``moe``: load, specialisation against the step-0 router, drops (``full``), or only the
    specialisation (other seeds); ``dense``: gradient conflict and FFN sparsity (``full`` only).
    """
    from moelab.analysis.pipeline import AnalyzeOptions, analyze_dense, analyze_moe
    from moelab.analysis.step0 import initial_model_from_config

    opts = AnalyzeOptions(
        data="validation split", out=out, seq_len=run.cfg.data.seq_len, specialization_only=not full, **ANALYSIS_BUDGET
    )
    if role == "moe":
        step0 = {"source": "run config", "seed": run.seed, "note": "the run's weights before its first step"}
        return analyze_moe(
            run.model, run.tokenizer, run.val, opts, Path(out),
            initial_model=initial_model_from_config(run.cfg), step0_info=step0,
        )  # fmt: skip
    return analyze_dense(run.model, run.val, opts) if full else {}


def _history(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return {
        "steps": [r["step"] for r in train],
        "tokens": [r["tokens"] for r in train],
        "loss": [r["lm_loss"] for r in train],  # LM loss only: comparable with validation and with dense
        "eval_steps": [r["step"] for r in evals],
        "eval_tokens": [r["tokens"] for r in evals],
        "val_loss": [r["val_loss"] for r in evals],
    }


def _seed_entry(o: RunOutcome, metric: str) -> dict[str, Any]:
    r = o.result
    last_train = [x for x in o.records if x.get("kind") == "train"][-1]
    return {
        "seed": o.seed,
        "final_val_loss": r.loss,
        "final_val_ppl": r.ppl,
        "final_val_metrics": r.metrics,
        "final_metric": r.metrics.get(metric, r.loss),
        "final_val_bpb": getattr(r, "bpb", None),
        "val_tokens_evaluated": r.tokens,
        "val_loss_by_domain": r.loss_by.get("domain", {}),
        "val_loss_by_lang": r.loss_by.get("lang", {}),
        "expert_load": {str(k): v for k, v in r.expert_load.items()},
        "tokens_per_s": last_train.get("tokens_per_s", 0.0),
        "train_time_s": last_train.get("train_time_s", 0.0),
        "wall_s": o.wall_s,
        "tokens": o.tokens,
        "train_flops": o.train_flops,
        "skipped_steps": o.skipped_steps,
        "history": _history(o.records),
    }


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _mean_dict(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise means over the keys every dict has (a label missing from one seed is left out)."""
    keys = [k for k in dicts[0] if all(k in d for d in dicts)] if dicts else []
    return {k: _mean([d[k] for d in dicts]) for k in keys}


def _mean_lists(lists: list[list[float]]) -> list[float]:
    n = min(len(x) for x in lists)
    return [_mean([x[i] for x in lists]) for i in range(n)]


def _model_entry(name: str, model_cfg: ModelConfig, outs: list[RunOutcome], metric: str) -> dict[str, Any]:
    """A model over its seeds: means (and the loss's sd), the first run's counts, and every seed."""
    per_seed = [_seed_entry(o, metric) for o in outs]
    first = outs[0]
    losses = [s["final_val_loss"] for s in per_seed]
    bpbs = [s["final_val_bpb"] for s in per_seed]
    layers = per_seed[0]["expert_load"].keys()
    histories = [s["history"] for s in per_seed]
    return {
        "kind": "moe" if model_cfg.moe is not None else "dense",
        "ffn_hidden": model_cfg.ffn_hidden,
        "params_total": first.counts.total,
        "params_active": first.counts.active,
        "params_embedding": first.counts.embedding,
        "flops_per_token": first.flops_per_token,
        "flops_formula": first.flops_formula,
        "tokens": first.tokens,
        "train_flops": first.train_flops,
        "tokens_per_param": first.tokens / first.counts.active,
        "tokens_per_total_param": first.tokens / first.counts.total,
        "seeds": [o.seed for o in outs],
        "final_val_loss": _mean(losses),
        "final_val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else math.nan,
        "final_val_ppl": math.exp(min(_mean(losses), 50.0)),
        "final_metric": _mean([s["final_metric"] for s in per_seed]),
        "final_val_metrics": _mean_dict([s["final_val_metrics"] for s in per_seed]),
        "final_val_bpb": _mean(bpbs) if all(b is not None for b in bpbs) else None,
        "val_tokens_evaluated": per_seed[0]["val_tokens_evaluated"],
        "val_loss_by_domain": _mean_dict([s["val_loss_by_domain"] for s in per_seed]),
        "val_loss_by_lang": _mean_dict([s["val_loss_by_lang"] for s in per_seed]),
        "expert_load": {k: _mean_lists([s["expert_load"][k] for s in per_seed]) for k in layers},
        "tokens_per_s": _mean([s["tokens_per_s"] for s in per_seed]),
        "train_time_s": _mean([s["train_time_s"] for s in per_seed]),
        "wall_s": sum(o.wall_s for o in outs),
        "skipped_steps": sum(o.skipped_steps for o in outs),
        "history": {k: _mean_lists([h[k] for h in histories]) for k in histories[0]},
        "per_seed": per_seed,
    }


def _difference_curve(moe: dict[str, Any], twin: dict[str, Any]) -> dict[str, Any]:
    """MoE − twin validation loss at every evaluation step, paired by seed, with a t interval per step."""
    per_seed = []
    for a, b in zip(moe["per_seed"], twin["per_seed"]):
        n = min(len(a["history"]["val_loss"]), len(b["history"]["val_loss"]))
        per_seed.append([x - y for x, y in zip(a["history"]["val_loss"][:n], b["history"]["val_loss"][:n])])
    n = min(len(d) for d in per_seed)
    steps = moe["history"]["eval_steps"][:n]
    tokens = moe["history"]["eval_tokens"][:n]
    mean, low, high = [], [], []
    for i in range(n):
        column = [d[i] for d in per_seed]
        mean.append(_mean(column))
        ci = t_interval(column) if len(column) > 1 else None
        low.append(ci.low if ci else math.nan)
        high.append(ci.high if ci else math.nan)
    return {
        "eval_steps": steps,
        "moe_flops": [t * moe["flops_per_token"] for t in tokens],
        "twin_flops": [t * twin["flops_per_token"] for t in tokens],
        "mean": mean,
        "low": low,
        "high": high,
        "per_seed": [d[:n] for d in per_seed],
    }


def _label_differences(moe: dict[str, Any], twin: dict[str, Any], twin_name: str, key: str) -> dict[str, Any]:
    """Per label value (domain, language): the paired MoE − twin difference of validation loss."""
    values = [v for v in moe[key] if v in twin[key]]
    out = {}
    for v in values:
        a = [s[key][v] for s in moe["per_seed"]]
        b = [s[key][v] for s in twin["per_seed"]]
        out[v] = paired_difference(a, b, "moe", twin_name, metric=f"val_loss[{v}]").to_json()
    return out


def differences(models: dict[str, dict[str, Any]], rule: Rule) -> dict[str, Any]:
    """For every twin: the verdict of ``rule`` on MoE vs twin, per-label differences, the difference curve."""
    moe = models["moe"]
    out = {}
    for name, twin in models.items():
        if name == "moe":
            continue
        a = [s["final_val_loss"] for s in moe["per_seed"]]
        b = [s["final_val_loss"] for s in twin["per_seed"]]
        out[name] = {
            "verdict": decide(rule, a, b, "moe", name).to_json(),
            "by_domain": _label_differences(moe, twin, name, "val_loss_by_domain"),
            "by_lang": _label_differences(moe, twin, name, "val_loss_by_lang"),
            "curve": _difference_curve(moe, twin),
        }
    return out


def _refuse_existing(out: Path, names: list[str]) -> None:
    """compare writes only folders it creates: an earlier compare's runs are never overwritten."""
    taken = [out / n for n in [*names, "analysis", "summary.json", "report.html"] if (out / n).exists()]
    if taken:
        raise UserError(
            f"{taken[0]} already exists: compare never overwrites an earlier run; give another --out or move it away"
        )


def run_compare(
    cfg: RunConfig,
    out_dir: str | Path,
    iso_total: bool = False,
    seeds: int | list[int] = 3,
    jobs: int | None = None,
    command: str = "moelab compare",
    analysis: bool = True,
    rule: Rule = COMPARE_RULE,
) -> dict[str, Any]:
    """Train every model of :func:`compare_models` for every seed, write ``summary.json`` and
    ``report.html``; return the summary. ``jobs`` runs train side by side (default: one per core)."""
    from moelab.report.compare import write_report

    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise UserError(f"--seeds needs at least one seed, all distinct (got {seeds})")
    out = Path(out_dir)
    models = compare_models(cfg, iso_total)
    _refuse_existing(out, list(models))
    t0 = time.perf_counter()
    cfg, data = prepare(cfg)
    objective = objective_of(cfg)
    prep_s = time.perf_counter() - t0
    skipped_analysis = ""
    if analysis and not is_plain_causal(objective):
        analysis = False  # the routing analysis traces next-token batches through a decoder
        skipped_analysis = f"routing analysis skipped: it runs on causal models; this compare trains {objective.name}"
    specs = []
    for name, model_cfg in models.items():
        role = "moe" if model_cfg.moe is not None else "dense"
        for seed in seed_list:
            full = seed == seed_list[0] and name in ("moe", "dense_iso_active")
            where = out / "analysis" if full else out / "analysis" / f"{name}-seed{seed}"
            probe = partial(analysis_probe, role=role, full=full, out=str(where)) if analysis else None
            run_cfg = replace(
                cfg,
                name=f"{cfg.name}-{name}-s{seed}",
                model=replace(model_cfg, vocab_size=data.tokenizer.vocab_size),
                train=replace(cfg.train, seed=seed),
            )
            specs.append(RunSpec(name, seed, run_cfg, out / name / f"seed{seed}", probe))
    jobs = jobs or default_jobs(len(specs))
    outcomes = run_all(specs, data, jobs)
    by_model: dict[str, list[RunOutcome]] = {name: [] for name in models}
    for o in outcomes:
        by_model[o.name].append(o)
    entries = {name: _model_entry(name, models[name], outs, objective.metric) for name, outs in by_model.items()}
    summary: dict[str, Any] = {
        "name": cfg.name,
        "command": command,
        "config": to_dict(cfg),
        "hardware": describe(cfg.train.device),
        "objective": objective.name,
        "metric": objective.metric,  # the objective's headline number (docs/objectives.md)
        "architecture": objective.architecture,
        "seeds": seed_list,
        "jobs": jobs,
        "threads": threads_per_job(jobs),
        "data": {
            "corpus": cfg.data.corpus,
            "tokenizer": data.tokenizer.kind,
            "vocab_size": data.tokenizer.vocab_size,
            "documents": data.num_documents,
            "train_tokens": data.splits.train.num_tokens,
            "val_tokens": data.splits.val.num_tokens,
            "val_documents": len(data.splits.val.doc_names),
            "prepare_s": prep_s,
        },
        "rule": rule.to_json(),
        "models": entries,
    }
    summary["differences"] = differences(entries, rule)
    summary["verdict"] = {f"moe_minus_{k}": d["verdict"]["comparison"]["mean"] for k, d in summary["differences"].items()}
    sections_html = ""
    if skipped_analysis:
        summary["analysis_skipped"] = skipped_analysis
    if analysis:
        summary["analysis"], sections_html = _gather_analysis(out, by_model, data)
    summary["wall_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    write_report(summary, out / "report.html", analysis_html=sections_html)
    return summary


def _gather_analysis(out: Path, by_model: dict[str, list[RunOutcome]], data: Any) -> tuple[dict[str, Any], str]:
    """The first seed's full analysis (MoE + dense twin) written to ``out/analysis``, and the
    corrected specialisation of every seed's MoE; returns (summary part, report sections HTML)."""
    from moelab.analysis.pipeline import merge_analyses
    from moelab.analysis.report import render_sections, render_sections_html, write_report

    moe_runs = by_model["moe"]
    dense_first = by_model.get("dense_iso_active", [None])[0]
    merged = merge_analyses(moe_runs[0].probe, dense_first.probe if dense_first is not None else None)
    merged.setdefault("summary", {}).update(
        {
            "model": f"moe, seed {moe_runs[0].seed} (trained in this compare)",
            "data": "the run's validation split",
            "validation documents": len(data.splits.val.doc_names),
            "tokens in split": data.splits.val.num_tokens,
        }
    )
    write_report(out / "analysis", merged, title="moelab compare: routing analysis of the MoE")
    part = {
        "report": "analysis/report.html",
        "data": {"split": "validation", "documents": len(data.splits.val.doc_names), "tokens": data.splits.val.num_tokens},
        "specialization": merged.get("specialization", {}),
        "specialization_over_seeds": specialization_over_seeds([o.probe.get("specialization", {}) for o in moe_runs]),
    }
    return part, render_sections_html(render_sections(merged))


def specialization_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Corrected NMI (and its gain over the step-0 router) per label and layer, mean and t interval over seeds."""
    out: dict[str, Any] = {}
    for spec in per_seed:
        for layer in spec.get("layers", []):
            for label, stats in layer.get("by_label", {}).items():
                cell = out.setdefault(label, {}).setdefault(str(layer["layer"]), {"corrected": [], "gain": []})
                cell["corrected"].append(stats.get("corrected", math.nan))
                cell["gain"].append(stats.get("gain", math.nan))
    for by_layer in out.values():
        for cell in by_layer.values():
            for key in ("corrected", "gain"):
                xs = [x for x in cell[key] if x is not None and math.isfinite(x)]
                ci = t_interval(xs) if len(xs) > 1 else None
                cell[f"{key}_mean"] = _mean(xs)
                cell[f"{key}_interval"] = ci.to_json() if ci else None
    return out


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON, written atomically (a temporary file beside it, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1), encoding="utf-8")
    tmp.replace(path)


def _finite(v: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
