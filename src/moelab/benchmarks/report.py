"""The bench record as a markdown report: ratios first, then rates, memory and the targets.

Targets are the issue's (MoE/dense forward+backward on CPU: fp32 ≤ 1.05 at E8k2 and ≤ 1.20 at
E64k8; bf16 ≤ 1.15 and ≤ 1.50; ``auto`` ≥ 3× faster than transformers' eager block at E64k8
and not slower than its ``grouped_mm`` at any shape). They are reported, never asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelab.benchmarks.layer import WEIGHTS_SUFFIX
from moelab.errors import UserError
from moelab.outputs import atomic_write_text, fresh_stem

TARGETS = {
    ("E8k2/h1024", "float32"): 1.05,
    ("E64k8/h256", "float32"): 1.20,
    ("E8k2/h1024", "bfloat16"): 1.15,
    ("E64k8/h256", "bfloat16"): 1.50,
}


def _f(v: object, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def layer_tables(layers: list[dict], title: str) -> list[str]:
    names: list[str] = []
    for rec in layers:
        names += [n for n in rec["rows"] if n not in names]
    lines = [
        f"### {title}: time / dense twin, forward+backward (forward only in brackets)",
        "",
        "| shape | dtype | " + " | ".join(names) + " |",
        "|---|---|" + "--:|" * len(names),
    ]
    for rec in layers:
        cells = []
        for n in names:
            row = rec["rows"].get(n)
            if row is None:
                cells.append("error" if n in rec.get("errors", {}) else "—")
                continue
            fwd = f" ({row['fwd_vs_dense']:.2f})" if "fwd_vs_dense" in row else ""
            cells.append(f"{row['fwdbwd_vs_dense']:.2f}{fwd}")
        lines.append(f"| {rec['name']} | {rec['dtype']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"### {title}: achieved GFLOP/s (active FLOPs, fwd+bwd) and activation memory saved for backward (MB)",
        "",
        "| shape | dtype | " + " | ".join(names) + " |",
        "|---|---|" + "--:|" * len(names),
    ]
    for rec in layers:
        cells = []
        for n in names:
            row = rec["rows"].get(n)
            cells.append(
                "—" if row is None else f"{row['fwdbwd_gflops']:.0f} / {row['saved_for_backward_MB']:.0f}"
            )
        lines.append(f"| {rec['name']} | {rec['dtype']} | " + " | ".join(cells) + " |")
    errors = [
        f"- {rec['name']} {rec['dtype']} {n}: {e}" for rec in layers for n, e in rec.get("errors", {}).items()
    ]
    return [*lines, "", *errors, ""] if errors else [*lines, ""]


def target_lines(layers: list[dict]) -> list[str]:
    lines = ["### Targets (auto backend)", "", "| check | target | measured | met |", "|---|--:|--:|---|"]
    for rec in layers:
        rows = rec["rows"]
        auto = rows.get("moe:auto")
        if auto is None:
            continue
        key = (rec["name"], rec["dtype"])
        low = rows.get(f"moe:auto{WEIGHTS_SUFFIX}")
        if key in TARGETS:
            r = auto["fwdbwd_vs_dense"]
            mode = " (autocast)" if low is not None else ""
            lines.append(
                f"| {rec['name']} {rec['dtype']}{mode} MoE/dense | ≤ {TARGETS[key]:.2f} | {r:.2f} | {'yes' if r <= TARGETS[key] else 'no'} |"
            )
            if low is not None:
                r = low["fwdbwd_vs_dense"]
                lines.append(
                    f"| {rec['name']} {rec['dtype']} (bf16 weights) MoE/dense | ≤ {TARGETS[key]:.2f} | {r:.2f} "
                    f"| {'yes' if r <= TARGETS[key] else 'no'} |"
                )
        auto = low or auto  # transformers' block runs with weights in the bench dtype: compare like with like
        if "hf:eager" in rows and rec["name"].startswith("E64"):
            s = rows["hf:eager"]["fwdbwd_s"] / auto["fwdbwd_s"]
            lines.append(
                f"| {rec['name']} {rec['dtype']} speed-up over hf eager | ≥ 3.00 | {s:.2f} | {'yes' if s >= 3 else 'no'} |"
            )
        if "hf:grouped_mm" in rows:
            s = rows["hf:grouped_mm"]["fwdbwd_s"] / auto["fwdbwd_s"]
            lines.append(
                f"| {rec['name']} {rec['dtype']} speed-up over hf grouped_mm | ≥ 1.00 | {s:.2f} | {'yes' if s >= 1 else 'no'} |"
            )
    return [*lines, ""]


def to_markdown(result: dict, command: str = "moelab bench") -> str:
    m = result["machine"]
    lines = [
        f"## moelab bench — {result['date']}",
        "",
        f"`{command}` on {m.get('gpu', m['device'])}, torch {m['torch']}, {m['threads']} threads, "
        f"bf16 matrix units: {m.get('cpu_bf16_units', m.get('bf16_fast'))}; "
        f"dense matmul GFLOP/s in this run: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["matmul_gflops"].items())
        + ".",
        "",
        "Ratios are interleaved medians within this run; absolute times drift between runs. In bf16,",
        "`dense` and `moe:*` run under autocast with fp32 weights (casts included); `*:lowp-weights` and",
        "`hf:*` run with bf16 weights and are divided by `dense:lowp-weights`.",
        "",
    ]
    lines += layer_tables(result["layer"], "MoE layer vs iso-active dense twin")
    if "gpu_peak_bf16_tflops" in result:
        lines += [f"MFU against {result['gpu_peak_bf16_tflops']:.0f} TFLOP/s bf16 peak:", ""]
        for rec in result["layer"]:
            mfu = ", ".join(f"{n} {r['mfu']:.1%}" for n, r in rec["rows"].items())
            lines.append(f"- {rec['name']} {rec['dtype']}: {mfu}")
        lines.append("")
    lines += target_lines(result["layer"])
    if "sweep" in result:
        lines += layer_tables(result["sweep"], "Sweep over E at fixed active FLOPs (k=2, h=1024)")
    if "skew" in result:
        for dtype, rec in result["skew"].items():
            backends = list(rec["rows"][0]["fwdbwd_s"])
            base = rec["rows"][0]["fwdbwd_s"]
            lines += [
                f"### Skewed router ({rec['shape']}, {dtype}): time / balanced time, fwd+bwd",
                "",
                "| skew | max/mean load | drops at cf 1.25 | " + " | ".join(backends) + " |",
                "|--:|--:|--:|" + "--:|" * len(backends),
            ]
            for row in rec["rows"]:
                cells = " | ".join(f"{row['fwdbwd_s'][b] / base[b]:.2f}" for b in backends)
                lines.append(
                    f"| {row['skew']:g} | {row['max_over_mean_load']:.2f} | {row['drop_rate_cf1.25']:.1%} | {cells} |"
                )
            lines.append("")
    if "model" in result:
        lines += ["### Training step (AdamW), tokens/s", ""]
        if any(rec["dtype"] == "bf16-master" for rec in result["model"]):
            lines += [
                "`bfloat16`: autocast over fp32 weights; `bf16-master`: bf16 weights under the same autocast, AdamW",
                "over fp32 master copies (`train.precision=bf16-master`).",
                "",
            ]
        lines += [
            "| preset | dtype | batch×seq | MoE (auto) | dense twin | MoE/dense time |",
            "|---|---|---|--:|--:|--:|",
        ]
        for rec in result["model"]:
            tps = rec["tokens_per_s"]
            lines.append(
                f"| {rec['preset']} | {rec['dtype']} | {rec['batch']}×{rec['seq']} | {tps['moe']:.0f} | "
                f"{tps['dense']:.0f} | {rec['moe_vs_dense_time']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def check_results_folder(out_dir: str | Path) -> Path:
    """Refuse a results ``--out`` that is a file (before anything is measured); return it as a Path.

    A results folder is shared by many runs (``benchmarks/results``): it is never refused for
    holding files, and nothing in it is ever replaced (:func:`write_report`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give the folder to write the results to")
    return out


def write_report(result: dict, out_dir: Path, stem: str, command: str) -> tuple[Path, Path]:
    """Write ``STEM.json`` and ``STEM.md`` into ``out_dir``, each in one step; return both paths.

    Results are named by the minute they were made (``bench-YYYYMMDD-HHMM``): when a file of that
    name is already there (a run in the same minute), the stem gets ``-2``, ``-3``, … instead of
    replacing it. Why: results in ``benchmarks/results`` are a record; a re-run never destroys one.
    """
    out_dir = check_results_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = fresh_stem(out_dir, stem, (".json", ".md"))
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(json_path, json.dumps({**result, "command": command}, indent=1, default=str))
    atomic_write_text(md_path, to_markdown(result, command))
    return json_path, md_path
