"""``moelab compare``: an MoE model and its dense twins, same data, same budget → numbers and plots.

Why this is the main job: an MoE claim is only meaningful against a dense model that spends the
same compute per token (iso-active twin) or holds the same parameters (iso-total twin). Every
model here is trained on the same prepared token blocks, in the same order (same sampler seed),
for the same number of steps, from the same seed, and evaluated on the same validation batches.

Output in ``OUT/``: one run folder per model (metrics.jsonl, checkpoints), ``summary.json`` and
a self-contained ``report.html``.

Training FLOPs per token follow Kaplan et al. (2020): ``6·N_active + 6·L·S·D``, where N_active
counts the active non-embedding parameters plus the LM head's matmul (``D·V``), and the
second term is the attention score/value work at context S.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.calc import arch_from_config, flops_per_token
from moelab.config import ModelConfig, RunConfig, to_dict
from moelab.data.prepare import prepare_data
from moelab.errors import UserError
from moelab.hardware import describe
from moelab.model.encoder_decoder import EncoderDecoder
from moelab.model.transformer import Transformer
from moelab.model.twins import count_params, dense_twin
from moelab.train.logging import read_metrics
from moelab.train.objective_step import is_plain_causal, objective_of, prepare_tokenizer
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


def compare_models(cfg: RunConfig, iso_total: bool = False) -> dict[str, ModelConfig]:
    """The models a compare trains: the MoE, its iso-active twin, and optionally its iso-total twin."""
    if cfg.model.moe is None:
        raise UserError("compare needs an MoE model: model.moe is null (try --preset tiny)")
    models = {"moe": cfg.model, "dense_iso_active": dense_twin(cfg.model, "iso_active")}
    if iso_total:
        models["dense_iso_total"] = dense_twin(cfg.model, "iso_total")
    return models


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


def run_compare(
    cfg: RunConfig,
    out_dir: str | Path,
    iso_total: bool = False,
    command: str = "moelab compare",
    analysis: bool = True,
) -> dict:
    """Train every model of :func:`compare_models`, write ``summary.json`` and ``report.html``; return the summary.

    With ``analysis`` the MoE's routing is analysed too (``analysis/``, embedded in the report).
    """
    from moelab.report.compare import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = compare_models(cfg, iso_total)
    t0 = time.perf_counter()
    cfg, data = prepare_data(cfg)
    objective = objective_of(cfg)
    prepare_tokenizer(data.tokenizer, objective)  # before any model reads the vocab size
    prep_s = time.perf_counter() - t0
    if analysis and not is_plain_causal(objective):
        analysis = False  # the routing analysis traces next-token batches through a decoder
        skipped_analysis = f"routing analysis skipped: it runs on causal models; this compare trains {objective.name}"
    else:
        skipped_analysis = ""
    summary: dict[str, Any] = {
        "name": cfg.name,
        "command": command,
        "config": to_dict(cfg),
        "hardware": describe(cfg.train.device),
        "objective": objective.name,
        "metric": objective.metric,  # the objective's headline number (docs/objectives.md)
        "architecture": objective.architecture,
        "data": {
            "corpus": cfg.data.corpus,
            "tokenizer": data.tokenizer.kind,
            "vocab_size": data.tokenizer.vocab_size,
            "documents": data.num_documents,
            "train_tokens": data.splits.train.num_tokens,
            "val_tokens": data.splits.val.num_tokens,
            "prepare_s": prep_s,
        },
        "models": {},
    }
    for name, model_cfg in models.items():
        run_cfg = replace(cfg, name=f"{cfg.name}-{name}", model=replace(model_cfg, vocab_size=data.tokenizer.vocab_size))
        trainer = Trainer(run_cfg, out / name, data=data)
        t = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - t
        counts = count_params(trainer.model)
        records = read_metrics(out / name)
        last_train = [r for r in records if r.get("kind") == "train"][-1]
        encoder_decoder = isinstance(trainer.model, EncoderDecoder)
        fpt = train_flops_per_token(run_cfg.model, counts.active, cfg.data.seq_len, encoder_decoder)
        summary["models"][name] = {
            "kind": "moe" if model_cfg.moe is not None else "dense",
            "ffn_hidden": model_cfg.ffn_hidden,
            "params_total": counts.total,
            "params_active": counts.active,
            "params_embedding": counts.embedding,
            "final_val_loss": result.loss,
            "final_val_ppl": result.ppl,
            "final_val_metrics": result.metrics,
            "final_metric": result.metrics.get(objective.metric, result.loss),
            "val_tokens_evaluated": result.tokens,
            "val_loss_by_domain": result.loss_by.get("domain", {}),
            "val_loss_by_lang": result.loss_by.get("lang", {}),
            "expert_load": {str(k): v for k, v in result.expert_load.items()},
            "tokens_per_s": last_train.get("tokens_per_s", 0.0),
            "train_time_s": last_train.get("train_time_s", 0.0),
            "wall_s": wall,
            "tokens": trainer.tokens_seen,
            "flops_per_token": fpt,
            "flops_formula": "kaplan-6N (encoder-decoder)" if encoder_decoder else "calc",
            "train_flops": fpt * trainer.tokens_seen,
            "skipped_steps": trainer.bad_total,
            "history": _history(records),
        }
    moe = summary["models"]["moe"]["final_val_loss"]
    summary["verdict"] = {
        f"moe_minus_{k}": moe - v["final_val_loss"] for k, v in summary["models"].items() if k != "moe"
    }
    sections_html = ""
    if skipped_analysis:
        summary["analysis_skipped"] = skipped_analysis
    if analysis:
        from moelab.report.compare_analysis import run_compare_analysis

        found = run_compare_analysis(out, cfg.data.corpus, cfg.data.seq_len)
        sections_html = found.pop("sections_html")
        summary["analysis"] = found
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    write_report(summary, out / "report.html", analysis_html=sections_html)
    return summary


def parameter_table(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of a config without training it (used by docs and tests)."""
    c = count_params(Transformer(cfg))
    return {"total": c.total, "active": c.active, "embedding": c.embedding}
