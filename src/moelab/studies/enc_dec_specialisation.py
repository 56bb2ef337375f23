"""Study ``enc-dec-specialisation``: do encoder experts specialise on token identity more than decoder experts?

Claim (ST-MoE, Zoph et al. 2022, §7: "encoder experts specialize" in token groups such as
punctuation or proper nouns, "decoder experts lack specialization"): in a Switch-style MoE
encoder–decoder trained with T5 span corruption, the experts the encoder picks carry more
information about the token they process than the experts the decoder picks.

Method: per seed, train the run's MoE as an encoder–decoder (``train.objective=span``: MoE in
both stacks, same router and sizes), then route held-out blocks through it with a fixed span
generator and take each token's top-1 expert per layer: encoder tokens are the corrupted inputs,
decoder tokens its inputs (the targets shifted right). Per layer, the baseline-corrected
NMI(top-1 expert; token id) (:func:`moelab.analysis.corrected.corrected_nmi`, arithmetic
normalisation): raw NMI minus the mean NMI after shuffling token ids between tokens. Raw NMI is
biased upwards by an amount that grows with the number of distinct tokens, and the decoder's
inputs (short targets) hold fewer tokens than the encoder's, so raw NMI compares the stacks at
different biases; the correction removes that. Both stacks are also measured on the same kind and
number of tokens: sentinels, EOS and the decoder's start token are left out (a sentinel's expert
says nothing about the text), and in each sequence the encoder's text tokens are subsampled (seeded)
to the number of text tokens the decoder has in that sequence (:func:`equal_text_tokens`: about 19
of each in a block of 128 at 15% noise, against ≈115 encoder and ≈26 decoder tokens before).
The resampling unit of the interval is a sequence
(a row of the batch): the corrupted inputs no longer map token by token onto documents. The same
statistic for the step-0 router (the run's initial weights) on the same tokens, and the gain. Per
seed, the mean over the encoder's and over the decoder's layers.

Verdict (:data:`CLAIM`): encoder vs decoder corrected token NMI, paired over seeds (one model per
seed holds both stacks), t interval and test, minimum effect 0.02.

Budgets: ``smoke`` trains the smoke preset for 8 steps (seconds); ``full`` trains the ``tiny``
preset (d 128, 4+4 layers, E=8, k=2) for 400 steps on ../shared/corpus — about 4 minutes per
seed on 2 cores, ≈ 13 minutes for 3 seeds with evaluation.

Legend: B batch, S block length, N tokens routed in a stack.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab.analysis.corrected import corrected_nmi
from moelab.analysis.step0 import initial_model_from_config
from moelab.experiment.run import TrainedRun
from moelab.stats import Rule
from moelab.studies import plots
from moelab.studies.arms import budget_summary
from moelab.studies.base import (
    SCORES,
    STUDIES,
    ArmClaim,
    Scored,
    StudyResult,
    arm_summary,
    base_run,
    data_label,
    train_outcomes,
)
from moelab.train.objective_step import EVAL_SEED

FULL_STEPS = 400
EVAL_BATCHES = 8
N_SHUFFLE = 20  # token-id permutations of the baseline
N_BOOT = 20  # half-samples of the sequences behind each interval
STACKS = ("encoder", "decoder")

# The claim, declared before any run. Minimum effect 0.02 NMI (2% of its range [0, 1]): a smaller gap
# between the stacks' corrected token NMI is no difference in how much their experts specialise.
CLAIM = ArmClaim(
    Rule("corrected_nmi", lower_is_better=False, min_effect=0.02, alpha=0.05, paired=True, unit="NMI"),
    "encoder",
    ("decoder",),
)
RAW_NOTE = (
    "the committed numbers are raw NMI, measured before the baseline correction: the rule is applied to "
    "them; re-run the study for the corrected statistic and the step-0 router"
)


@torch.no_grad()
def _top1_tokens(
    model: nn.Module, obs: list, n_enc: int
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{layer: (top-1 expert [N], token id [N], sequence [N])}`` of prepared objective batches, tokens in
    their flattened order (so two models' arrays align token by token)."""
    model.eval()
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    row0 = 0
    for ob in obs:
        out = model(**ob.model_inputs(), return_routing=True)
        for layer, d in out.routing.items():
            ids_BS = ob.input_ids if layer < n_enc else ob.decoder_input_ids
            top1 = d.rank == 0
            order = torch.argsort(d.token[top1], stable=True)
            tok = d.token[top1][order]
            rows = tok // ids_BS.shape[1] + row0
            parts.setdefault(layer, []).append(
                (
                    d.expert[top1][order].cpu().numpy(),
                    ids_BS.reshape(-1)[tok].cpu().numpy(),
                    rows.cpu().numpy(),
                )
            )
        row0 += ob.input_ids.shape[0]
    return {layer: tuple(np.concatenate([p[j] for p in ps]) for j in range(3)) for layer, ps in parts.items()}  # type: ignore[misc]


def equal_text_tokens(
    enc_tokens: np.ndarray, enc_rows: np.ndarray, dec_tokens: np.ndarray, dec_rows: np.ndarray,
    special: np.ndarray, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the encoder's and the decoder's routed tokens (flattened order, ``[N_enc]`` and
    ``[N_dec]`` with their sequence ``rows``) so that both stacks keep only text tokens (ids not in
    ``special``) and the same number of them in every sequence: in each row, ``n = min(text tokens of
    either stack)`` tokens of each, drawn without replacement by a generator seeded with ``seed``.
    Both index arrays are sorted (flattened order kept)."""
    rng = np.random.default_rng(seed)
    enc_text = ~np.isin(enc_tokens, special)
    dec_text = ~np.isin(dec_tokens, special)
    keep_enc: list[np.ndarray] = []
    keep_dec: list[np.ndarray] = []
    for row in np.union1d(enc_rows, dec_rows):
        e = np.flatnonzero(enc_text & (enc_rows == row))
        d = np.flatnonzero(dec_text & (dec_rows == row))
        n = min(len(e), len(d))
        keep_enc.append(rng.choice(e, size=n, replace=False) if n < len(e) else e)
        keep_dec.append(rng.choice(d, size=n, replace=False) if n < len(d) else d)
    return np.sort(np.concatenate(keep_enc)).astype(np.int64), np.sort(np.concatenate(keep_dec)).astype(np.int64)


@torch.no_grad()
def token_nmi_per_layer(run: TrainedRun) -> dict[str, Any]:
    """The probe: per stack and layer, raw and corrected NMI(top-1 expert; token id) of the trained
    model, and the step-0 router's corrected NMI and the gain, on validation blocks."""
    trainer = run.trainer
    objective, tok = trainer.objective, run.tokenizer
    n_enc = run.model.cfg.encoder.n_layers
    gen = torch.Generator().manual_seed(EVAL_SEED)
    obs = [
        objective.prepare(b.input_ids, b.labels, tok, gen).to(trainer.device)
        for b in trainer.val_batches[:EVAL_BATCHES]
    ]
    trained = _top1_tokens(run.model, obs, n_enc)
    initial = _top1_tokens(initial_model_from_config(run.cfg).to(trainer.device), obs, n_enc)
    special = np.array([*tok.sentinel_ids(), tok.eos_id, tok.pad_id], dtype=np.int64)
    enc_layers, dec_layers = [i for i in trained if i < n_enc], [i for i in trained if i >= n_enc]
    if not enc_layers or not dec_layers:
        raise ValueError("enc-dec-specialisation needs MoE layers in both stacks (moe.placement)")
    enc0, dec0 = enc_layers[0], dec_layers[0]  # every layer of a stack routes the same tokens in the same order
    keep = dict(zip(STACKS, equal_text_tokens(*trained[enc0][1:], *trained[dec0][1:], special, seed=EVAL_SEED)))
    out: dict[str, Any] = {
        key: {s: [] for s in STACKS} for key in ("nmi", "corrected", "step0_corrected", "gain", "tokens")
    }
    for layer in sorted(trained):
        stack = "encoder" if layer < n_enc else "decoder"
        idx = keep[stack]
        experts, tokens, rows = (a[idx] for a in trained[layer])
        e = corrected_nmi(
            experts, tokens, rows, N_SHUFFLE, N_BOOT, unit="token", initial_expert_N=initial[layer][0][idx]
        )
        out["tokens"][stack].append(float(len(idx)))
        for key, value in (("nmi", e["nmi"]), ("corrected", e["corrected"]),
                           ("step0_corrected", e["step0"]["corrected"]), ("gain", e["gain"])):  # fmt: skip
            out[key][stack].append(value)
    return out


@SCORES.register("enc-dec-specialisation")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    """:data:`CLAIM` on the stored per-seed corrected NMI (raw NMI, said so, on pages written before)."""
    if CLAIM.rule.metric not in arms.get(CLAIM.better, {}).get("per_seed", {}):
        return CLAIM.with_metric("token_nmi").score(arms, note=RAW_NOTE)
    return CLAIM.score(arms)


def _plot(per_seed: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plots.subplots(figsize=(6, 3.5))
    for stack, color in (("encoder", "tab:blue"), ("decoder", "tab:orange")):
        arr = np.array([s["corrected"][stack] for s in per_seed])  # [seeds, layers]
        xs = np.arange(arr.shape[1])
        ax.errorbar(xs, arr.mean(0), yerr=arr.std(0), marker="o", capsize=3, color=color, label=stack)
        for row in arr:  # every seed's value
            ax.scatter(xs, row, s=8, color=color, alpha=0.5)
        arr0 = np.array([s["step0_corrected"][stack] for s in per_seed])
        ax.plot(xs, arr0.mean(0), linestyle="--", color=color, alpha=0.7, label=f"{stack} at step 0")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("layer within its stack")
    ax.set_ylabel("corrected NMI(top-1 expert; token id)")
    ax.set_title("Expert-token specialisation, mean ± std over seeds, points per seed", fontsize=9)
    ax.legend(fontsize=7)
    plots.save(fig, path)


@STUDIES.register("enc-dec-specialisation")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    base = base_run(budget, FULL_STEPS)
    base = replace(base, train=replace(base.train, objective="span"))
    outcomes = train_outcomes(base, {"enc-dec": base.model}, seeds, out, probe=token_nmi_per_layer, jobs=jobs)
    per_seed = [{"seed": seed, **o.probe} for seed, o in zip(seeds, outcomes["enc-dec"])]
    metrics = {
        "corrected_nmi": "corrected",
        "token_nmi": "nmi",
        "step0_corrected_nmi": "step0_corrected",
        "gain": "gain",
        "tokens_measured": "tokens",
    }
    arms = {
        stack: arm_summary(
            {m: [statistics.fmean(s[key][stack]) for s in per_seed] for m, key in metrics.items()}
        )
        for stack in STACKS
    }
    plot = out / "enc-dec-specialisation.png"
    _plot(per_seed, plot)
    return StudyResult.scored(
        score(arms, {}),
        name="enc-dec-specialisation",
        claim="encoder experts specialise more on token identity than decoder experts (ST-MoE)",
        method=(
            "per seed an MoE encoder-decoder (MoE in both stacks) trained with T5 span corruption; on held-out "
            "blocks, text tokens only (sentinels, EOS and the decoder's start token left out) and as many encoder as "
            "decoder tokens in every sequence (the encoder's subsampled, seeded; tokens_measured per layer); per "
            f"layer the corrected NMI(top-1 expert; token id) = NMI minus the mean of {N_SHUFFLE} token-id shuffles, "
            "the same for the step-0 router and the gain; encoder vs decoder mean over layers (per-layer values in "
            "the JSON)"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        numbers={"per_seed": per_seed, "steps": base.train.steps, "budget_arms": budget_summary(outcomes)},
        plots=[str(plot)],
    )
