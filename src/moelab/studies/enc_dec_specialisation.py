"""Study ``enc-dec-specialisation``: do encoder experts specialise on token identity more than decoder experts?

Claim (ST-MoE, Zoph et al. 2022, §7: "encoder experts specialize" in token groups such as
punctuation or proper nouns, "decoder experts lack specialization"): in a Switch-style MoE
encoder–decoder trained with T5 span corruption, the experts the encoder picks carry more
information about the token they process than the experts the decoder picks.

Method: per seed, train the run's MoE as an encoder–decoder (``train.objective=span``: MoE in
both stacks, same router and sizes), then route held-out blocks through it with a fixed span
generator and take each token's top-1 expert per layer: encoder tokens are the corrupted inputs,
decoder tokens its inputs (the targets shifted right). Per layer, NMI(top-1 expert; token id)
(``moelab.analysis.specialization.nmi``, arithmetic normalisation); per seed, the mean over the
encoder's and over the decoder's layers. Verdict: encoder mean vs decoder mean over seeds with
:func:`moelab.studies.base.verdict` (higher is better: "supported" when the encoder's exceeds the
decoder's by more than 2 pooled seed standard deviations).

Budgets: ``smoke`` trains the smoke preset for 8 steps (seconds); ``full`` trains the ``tiny``
preset (d 128, 4+4 layers, E=8, k=2) for 400 steps on ../shared/corpus — about 4 minutes per
seed on 2 cores, ≈ 13 minutes for 3 seeds with evaluation.

Legend: B batch, S block length, N tokens routed in a stack.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moelab.analysis.specialization import nmi
from moelab.studies import plots
from moelab.studies.base import STUDIES, StudyResult, arm_comparison, arm_summary, base_run, train_arms
from moelab.train.objective_step import EVAL_SEED
from moelab.train.trainer import Trainer

FULL_STEPS = 400
EVAL_BATCHES = 8


@torch.no_grad()
def token_nmi_per_layer(trainer: Trainer) -> dict[str, list[float]]:
    """``{"encoder": [NMI per layer], "decoder": [...]}`` of top-1 expert vs token id on validation blocks."""
    model, objective, tok = trainer.model, trainer.objective, trainer.data.tokenizer
    model.eval()
    n_enc = model.cfg.encoder.n_layers
    gen = torch.Generator().manual_seed(EVAL_SEED)
    experts: dict[int, list[np.ndarray]] = {}
    tokens: dict[int, list[np.ndarray]] = {}
    for b in trainer.val_batches[:EVAL_BATCHES]:
        ob = objective.prepare(b.input_ids, b.labels, tok, gen).to(trainer.device)
        out = model(**ob.model_inputs(), return_routing=True)
        for layer, d in out.routing.items():
            ids_BS = ob.input_ids if layer < n_enc else ob.decoder_input_ids
            top1 = d.rank == 0
            experts.setdefault(layer, []).append(d.expert[top1].cpu().numpy())
            tokens.setdefault(layer, []).append(ids_BS.reshape(-1)[d.token[top1]].cpu().numpy())
    per_stack: dict[str, list[float]] = {"encoder": [], "decoder": []}
    for layer in sorted(experts):
        value = nmi(np.concatenate(experts[layer]), np.concatenate(tokens[layer]))
        per_stack["encoder" if layer < n_enc else "decoder"].append(value)
    return per_stack


def _plot(per_seed: list[dict[str, list[float]]], path: Path) -> None:
    fig, ax = plots.subplots(figsize=(6, 3.5))
    for stack, color in (("encoder", "tab:blue"), ("decoder", "tab:orange")):
        arr = np.array([s[stack] for s in per_seed])  # [seeds, layers]
        xs = np.arange(arr.shape[1])
        ax.errorbar(xs, arr.mean(0), yerr=arr.std(0), marker="o", capsize=3, color=color, label=stack)
    ax.set_xlabel("layer within its stack")
    ax.set_ylabel("NMI(top-1 expert; token id)")
    ax.set_title("Expert-token specialisation, mean ± std over seeds")
    ax.legend()
    plots.save(fig, path)


@STUDIES.register("enc-dec-specialisation")
def run(budget: str, seeds: list[int], out: Path) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    base = replace(base, train=replace(base.train, objective="span"))
    per_seed: list[dict[str, list[float]]] = []

    def probe(trainer: Trainer) -> dict[str, float]:
        per_seed.append(token_nmi_per_layer(trainer))
        return {}

    train_arms(base, {"enc-dec": base.model}, seeds, out, extra=probe)
    arms = {
        stack: arm_summary({"token_nmi": [statistics.fmean(s[stack]) for s in per_seed]})
        for stack in ("encoder", "decoder")
    }
    plot = out / "enc-dec-specialisation.png"
    _plot(per_seed, plot)
    return arm_comparison(
        "enc-dec-specialisation",
        claim="encoder experts specialise more on token identity than decoder experts (ST-MoE)",
        method=(
            "per seed an MoE encoder-decoder (MoE in both stacks) trained with T5 span corruption; on held-out "
            "blocks, NMI(top-1 expert; token id) per layer; encoder vs decoder mean over layers"
        ),
        budget=budget,
        seeds=seeds,
        base=base,
        arms=arms,
        better="encoder",
        than="decoder",
        metric="token_nmi",
        lower_is_better=False,
        numbers={"token_nmi_per_layer": per_seed, "steps": base.train.steps},
        plots=[str(plot)],
    )
