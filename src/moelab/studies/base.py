"""Shared machinery of the studies: budgets, seeds, arms trained on the same data, mean ± std,
the computed verdict, and writing ``docs/studies/NAME.{md,json}`` plus the claims index.

Why one module: every study must obey the same rules (same data order and token budget across
arms, ≥ 3 seeds, a verdict from the numbers, never by hand), so the rules live in one place.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moelab.config import ModelConfig, RunConfig, run_preset
from moelab.errors import UserError
from moelab.registry import Registry

VERDICTS = ("supported", "not supported", "inconclusive")
# metrics drawn, in this order, for a study that returns no figure of its own
BAR_METRICS = ("val_loss", "drop_rate", "drop_first_quarter", "drop_last_quarter", "load_cv", "dead_experts", "tokens_per_s")
BUDGETS = ("smoke", "full")

# The twelve studies of issue 11 and issue 14's encoder-decoder study, one line each; those in STUDIES run.
CATALOG: dict[str, str] = {
    "iso-flop": "MoE (E 4-32, k 2) vs iso-active / iso-total dense: loss vs training FLOPs, compute multiplier",
    "sqrt-rule": "dense ladder fit loss(N); MoE dense-equivalent size vs sqrt(active x total)",
    "routers": "topk, switch, noisy_topk, expert_choice, sigmoid_bias, hash at equal budget",
    "granularity": "fine-grained and shared experts at equal active and total parameters (DeepSeekMoE)",
    "placement": "MoE in every layer, every other layer, all but the first, only the last half",
    "capacity": "capacity factor 0.5/1.0/1.25/2.0 vs dropless: loss and drops (drops towards the end)",
    "data-hunger": "MoE vs dense on unique vs repeated data: does MoE overfit repeated data sooner",
    "swarm": "request-level routing over dense models vs token-level MoE",
    "specialisation": "NMI of expert choice with domain/language/position/token; early routing learning",
    "sparsity": "dense FFN activation sparsity; MoEfication vs MoE from scratch",
    "gradient-conflict": "per-domain gradient cosine in a dense FFN vs within MoE experts",
    "hybrid-inference": "bandwidth argument for MoE on CPU+GPU: calc predictions vs published figures",
    "enc-dec-specialisation": "encoder experts specialise on token identity more than decoder experts (ST-MoE)",
}


@dataclass
class StudyResult:
    """What a study returns: rows of the table, numbers, plots written, and the computed verdict."""

    name: str
    claim: str
    method: str
    budget: str
    seeds: list[int]
    data: str  # which corpus was used
    arms: dict[
        str, dict[str, Any]
    ]  # arm → {"config": ..., "per_seed": {metric: [..]}, "mean": .., "std": ..}
    verdict: str
    verdict_reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    command: str = ""
    wall_s: float | None = None  # set by run_study: how long the whole study took
    threads: int | None = None  # torch threads per run
    jobs: int | None = None  # runs trained side by side (``--jobs``)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


STUDIES: Registry[Callable[..., StudyResult]] = Registry("study")


def verdict(a: list[float], b: list[float], lower_is_better: bool = True, k: float = 2.0) -> tuple[str, str]:
    """Is arm ``a`` better than arm ``b``? Computed, never hand-written.

    ``supported`` when a's mean beats b's by more than ``k`` × the pooled seed std;
    ``not supported`` when b beats a by that margin; ``inconclusive`` otherwise (including
    fewer than 2 seeds per arm, where no spread can be measured).
    """
    if len(a) < 2 or len(b) < 2:
        return "inconclusive", "fewer than 2 seeds per arm: no seed spread"
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    spread = math.sqrt((statistics.stdev(a) ** 2 + statistics.stdev(b) ** 2) / 2)
    diff = (mb - ma) if lower_is_better else (ma - mb)  # > 0: a better
    reason = f"difference {diff:+.4f} vs {k:g}x seed std {k * spread:.4f}"
    if diff > k * spread:
        return "supported", reason
    if -diff > k * spread:
        return "not supported", reason
    return "inconclusive", reason


def arm_comparison(
    name: str,
    claim: str,
    method: str,
    budget: str,
    seeds: list[int],
    base: RunConfig,
    arms: dict[str, dict[str, Any]],
    better: str,
    than: str,
    metric: str = "val_loss",
    lower_is_better: bool = True,
    numbers: dict[str, Any] | None = None,
    plots: list[str] | None = None,
) -> StudyResult:
    """The result of a study whose claim is "arm ``better`` beats arm ``than`` on ``metric``"
    (by default: reaches a lower validation loss), the verdict computed by :func:`verdict`."""
    v, why = verdict(arms[better]["per_seed"][metric], arms[than]["per_seed"][metric], lower_is_better)
    return StudyResult(
        name=name,
        claim=claim,
        method=method,
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        verdict=v,
        verdict_reason=why,
        numbers=numbers or {},
        plots=plots or [],
    )


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def arm_summary(per_seed: dict[str, list[float]]) -> dict[str, Any]:
    """One arm of a study: ``{"per_seed": {metric: [..]}, "mean": {metric: ..}, "std": {metric: ..}}``."""
    return {
        "per_seed": per_seed,
        "mean": {k: mean_std(v)[0] for k, v in per_seed.items()},
        "std": {k: mean_std(v)[1] for k, v in per_seed.items()},
    }


def shared_corpus(start: Path | None = None) -> Path | None:
    """``shared/corpus`` beside the repository root (as tests/helpers.py looks), or None."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "corpus"
        if (parent / "pyproject.toml").is_file() and cand.is_dir():
            return cand
    return None


def base_run(budget: str, full_steps: int = 200) -> RunConfig:
    """The run every arm starts from: the ``smoke`` preset shrunk further, or ``tiny`` for full.

    ``full`` trains the ``tiny`` model for ``full_steps`` steps (each study picks its own so that
    every arm and seed fit in a few minutes to half an hour on 2 CPU cores: the preset's 1000 steps
    × arms × seeds would take hours), warm-up a tenth of that, and evaluates only at the end
    unless the study asks for curves.
    """
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}: expected one of {', '.join(BUDGETS)}")
    if budget == "smoke":
        cfg = run_preset("smoke")
        tr = replace(
            cfg.train,
            steps=8,
            batch_size=4,
            warmup_steps=2,
            eval_every=0,
            eval_batches=2,
            log_every=4,
            progress=False,
        )
        data = replace(cfg.data, corpus="builtin", max_bytes_per_domain=20_000, synthetic_docs=20)
        return replace(cfg, train=tr, data=data)
    cfg = run_preset("tiny")
    corpus = shared_corpus()
    data = replace(cfg.data, corpus=str(corpus)) if corpus else cfg.data
    train = replace(
        cfg.train, steps=full_steps, warmup_steps=min(50, full_steps // 4), eval_every=0, progress=False
    )
    return replace(cfg, data=data, train=train)


JOBS: dict[str, int] = {"jobs": 1, "threads": 1}  # set by run_study: runs side by side, threads each


def train_one(spec: Any, data: Any, extra: Callable | None = None) -> tuple[dict[str, float], dict[str, list[float]], dict]:
    """Train one (arm, seed) run of :func:`train_arms` on prepared ``data``; returns its numbers,
    its held-out curve (tokens, FLOPs, loss at every evaluation) and its loss per label value."""
    from moelab.calc import arch_from_config, flops_per_token
    from moelab.train.trainer import Trainer

    base = spec.base
    run = replace(base, name=f"{spec.arm}-s{spec.seed}", model=spec.model, train=replace(base.train, seed=spec.seed))
    trainer = Trainer(run, spec.run_dir, data=data)
    res = trainer.train()
    fpt = flops_per_token(arch_from_config(spec.model), base.data.seq_len)["training"]
    vals = {"val_loss": res.loss, "tokens": float(trainer.tokens_seen), "train_flops": fpt * trainer.tokens_seen}
    if extra is not None:
        vals.update(extra(trainer))
    pts = eval_points(trainer.run_dir / "metrics.jsonl")
    curve = {"tokens": [t for t, _ in pts], "flops": [fpt * t for t, _ in pts], "val_loss": [v for _, v in pts]}
    return vals, curve, res.loss_by


def train_arms(
    base: RunConfig,
    arms: dict[str, ModelConfig],
    seeds: list[int],
    out: Path,
    extra: Callable | None = None,
    curves: bool = False,
    by_label: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Train every arm for every seed on the same prepared data (same order, same token budget).

    ``extra(trainer) -> dict[str, float]`` adds per-seed metrics (e.g. drop rates).
    ``curves=True`` also keeps, per seed, the held-out loss at every evaluation of the run
    (``train.eval_every``) as ``arm["curves"] = [{"tokens": [..], "flops": [..], "val_loss": [..]}]``.
    ``by_label`` (default: on except at the smoke budget, whose base run is named ``smoke``) keeps the
    final validation loss per label value of a labelled corpus (domain, language) as
    ``arm["by_label"] = {label: {value: {"per_seed": [..], "mean": .., "std": ..}}}``.
    """
    if by_label is None:
        by_label = base.name != "smoke"
    from moelab.data.prepare import prepare_data
    from moelab.studies.parallel import RunSpec, parallel_ok, run_parallel

    base, data = prepare_data(base)
    specs = [
        RunSpec(arm, seed, replace(model_cfg, vocab_size=data.tokenizer.vocab_size), base, out / arm / f"seed{seed}")
        for arm, model_cfg in arms.items()
        for seed in seeds
    ]
    if parallel_ok(extra, JOBS["jobs"], len(specs)):
        outcomes = run_parallel(specs, base, JOBS["jobs"], JOBS["threads"])
    else:
        outcomes = [train_one(spec, data, extra) for spec in specs]
    by_arm: dict[str, list[tuple[Any, ...]]] = {arm: [] for arm in arms}
    for spec, outcome in zip(specs, outcomes):
        by_arm[spec.arm].append(outcome)  # seed order kept
    result: dict[str, dict[str, Any]] = {}
    for arm, runs in by_arm.items():
        per_seed: dict[str, list[float]] = {}
        curve_list: list[dict[str, list[float]]] = []
        labels: dict[str, dict[str, list[float]]] = {}
        for vals, curve, loss_by in runs:
            if curves:
                curve_list.append(curve)
            for k, v in vals.items():
                per_seed.setdefault(k, []).append(float(v))
            if by_label:
                for name, by_value in loss_by.items():
                    for value, loss in by_value.items():
                        labels.setdefault(name, {}).setdefault(str(value), []).append(float(loss))
        result[arm] = arm_summary(per_seed)
        if curves:
            result[arm]["curves"] = curve_list
        if labels:
            result[arm]["by_label"] = {
                name: {
                    value: {"per_seed": xs, "mean": mean_std(xs)[0], "std": mean_std(xs)[1]}
                    for value, xs in by_value.items()
                    if len(xs) == len(seeds)  # a value missing from some seed's held-out set is left out
                }
                for name, by_value in labels.items()
            }
    return result


def eval_points(metrics: Path) -> list[tuple[float, float]]:
    """(tokens seen, validation loss) of every eval record in a run's ``metrics.jsonl``, in order."""
    pts = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            pts.append((float(rec["tokens"]), float(rec["val_loss"])))
    return pts


def data_label(base: RunConfig) -> str:
    """Which corpus a study used, as a reader of the page finds it (the shared corpus by its
    place beside the repository, not this machine's absolute path)."""
    corpus = base.data.corpus
    shared = shared_corpus()
    if shared is not None and Path(corpus).expanduser().resolve() == shared.resolve():
        corpus = "../shared/corpus"
    return f"{corpus} (tokenizer {base.data.tokenizer})"


def write_study(res: StudyResult, docs: Path) -> None:
    """``docs/NAME.json`` (every number) and ``docs/NAME.md`` (method, table, verdict, command),
    then regenerate ``docs/README.md`` from every JSON there."""
    docs.mkdir(parents=True, exist_ok=True)
    res.plots = [_place_plot(p, docs) for p in res.plots]
    if not res.plots:  # a study without its own figure gets bars of its main metrics
        from moelab.studies import plots

        shown = [m for m in BAR_METRICS if any(m in a["mean"] for a in res.arms.values())]
        if shown:
            plots.arm_bars(res.arms, shown, docs / f"{res.name}.png", f"{res.name} (mean ± std over seeds)")
            res.plots = [f"{res.name}.png"]
    (docs / f"{res.name}.json").write_text(json.dumps(res.to_json(), indent=1), encoding="utf-8")
    metrics = sorted({m for a in res.arms.values() for m in a["mean"]})
    lines = [
        f"# study: {res.name}",
        "",
        f"**Claim.** {res.claim}",
        "",
        f"**Method.** {res.method}",
        "",
        f"Budget `{res.budget}`, seeds {res.seeds}, data: {res.data}.",
        "",
        "| arm | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for arm, a in res.arms.items():
        cells = [f"{a['mean'][m]:.4g} ± {a['std'][m]:.2g}" if m in a["mean"] else "" for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += label_tables(res.arms)
    lines += ["", f"**Verdict: {res.verdict}** ({res.verdict_reason})", ""]
    lines += [f"![{p}]({p})" for p in res.plots]
    lines += ["", "Command:", "", f"    {res.command}", ""]
    if res.wall_s is not None:
        threads = f"{res.threads} torch thread" + ("s" if res.threads != 1 else "")
        if (res.jobs or 1) > 1:
            threads = f"{res.jobs} runs side by side of {threads} each"
        lines += [f"Wall time {res.wall_s / 60:.1f} min with {threads}.", ""]
    (docs / f"{res.name}.md").write_text("\n".join(lines), encoding="utf-8")
    write_index(docs)


def _place_plot(plot: str, docs: Path) -> str:
    """A plot the study wrote elsewhere (its run folder) is copied beside the page; the page links
    it by file name."""
    src = Path(plot)
    if src.is_absolute() or src.parent != Path("."):
        if src.is_file() and src.resolve() != (docs / src.name).resolve():
            shutil.copyfile(src, docs / src.name)
        return src.name
    return plot


def label_tables(arms: dict[str, dict[str, Any]], max_cols: int = 12) -> list[str]:
    """One markdown table per label (domain, language): validation loss per value, arms as rows.

    Labels with more than ``max_cols`` values stay in the JSON only (too wide to read)."""
    names = sorted({n for a in arms.values() for n in a.get("by_label", {})})
    lines: list[str] = []
    for name in names:
        values = sorted({v for a in arms.values() for v in a.get("by_label", {}).get(name, {})})
        if not values or len(values) > max_cols:
            continue
        lines += ["", f"Validation loss by {name}:", "", "| arm | " + " | ".join(values) + " |"]
        lines.append("|---" * (len(values) + 1) + "|")
        for arm, a in arms.items():
            cell = a.get("by_label", {}).get(name, {})
            cells = [f"{cell[v]['mean']:.4g} ± {cell[v]['std']:.2g}" if v in cell else "" for v in values]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def write_index(docs: Path) -> None:
    rows = [
        "# Studies",
        "",
        "Generated by `moelab study`; one row per study in the catalog."
        + (" Methods, budgets and wall times: [methods.md](methods.md)." if (docs / "methods.md").is_file() else ""),
        "",
        "| study | claim | verdict | budget |",
        "|---|---|---|---|",
    ]
    for name, line in CATALOG.items():
        f = docs / f"{name}.json"
        if f.is_file():
            d = json.loads(f.read_text(encoding="utf-8"))
            rows.append(f"| [{name}]({name}.md) | {d['claim']} | {d['verdict']} | {d['budget']} |")
        else:
            status = "not run" if name in STUDIES else "not implemented"
            rows.append(f"| {name} | {line} | {status} | |")
    (docs / "README.md").write_text("\n".join(rows) + "\n", encoding="utf-8")


def run_study(
    name: str,
    budget: str = "smoke",
    seeds: int = 3,
    out: Path | str = "runs/studies",
    docs: Path | str = "docs/studies",
    command: str = "",
    jobs: int = 1,
) -> StudyResult:
    """Run study ``name`` and write its page. ``jobs`` > 1 trains that many (arm, seed) runs side
    by side, each on ``torch.get_num_threads() // jobs`` threads (runs with a probe stay
    sequential); the numbers equal a sequential run with that many threads per run."""
    if name not in CATALOG:
        raise UserError(f"unknown study {name!r}: see `moelab study --list`")
    if name not in STUDIES:
        raise UserError(f"study {name!r} is not implemented yet (see `moelab study --list`)")
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    threads = max(1, torch.get_num_threads() // jobs) if jobs > 1 else torch.get_num_threads()
    JOBS.update(jobs=jobs, threads=threads)
    start = time.perf_counter()
    try:
        res = STUDIES[name](budget=budget, seeds=list(range(seeds)), out=Path(out) / name)
    finally:
        JOBS.update(jobs=1, threads=1)
    res.wall_s, res.threads, res.jobs = round(time.perf_counter() - start, 1), threads, jobs
    res.command = command or f"moelab study {name} --budget {budget} --seeds {seeds}"
    write_study(res, Path(docs))
    return res
