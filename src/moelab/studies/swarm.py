"""Study ``swarm``: request-level routing over per-domain dense models vs token-level MoE.

Claim (seed note 003): one MoE with token-level routing beats a "swarm" of dense models, one per
domain, that a classifier picks from per request — at equal total and equal active parameters —
because its experts share attention and a hidden space and switch expert per token, not per
document.

Arms, per seed, on the same prepared data (D = domains with at least ``MIN_SHARE`` of the
training blocks; a block's domain is the majority label of its tokens):
- ``moe``: the preset's MoE with E experts chosen so that its total parameters (embedding
  included) are closest to D × a specialist's: equal total; its active parameters equal a
  specialist's up to the router: equal active. Batch B, ``steps`` steps.
- ``dense_general``: one specialist-sized dense model (the MoE's iso-active twin) on all data,
  batch B: the single-model reference.
- D specialists, branch-train-merge style (Li et al. 2022, BTM): one shared dense model (the
  iso-active twin) is trained on all data with batch B for the first ``SEED_SHARE`` of the steps (the
  "seed" phase); each specialist starts from its weights and trains on its domain's blocks only with
  batch B/D for the remaining steps, at the learning rate scaled by sqrt(B/D ÷ B) (square-root
  scaling for Adam: a smaller batch takes a smaller step). The swarm's training tokens and FLOPs
  equal the MoE's and the general model's. (Until 2026-12-06 the specialists trained from scratch at
  batch B/D with the general model's rate, and the general model beat even the oracle-routed swarm.)
  Scored three ways: ``swarm_classifier`` (a multinomial naive-Bayes classifier on token counts of
  the training blocks reads the request's first ``PROMPT`` tokens and picks one specialist),
  ``swarm_oracle`` (the true domain's specialist: the classifier's ceiling) and
  ``swarm_logit_avg`` (all D specialists' logits averaged, as the issue asks) and ``swarm_prob_avg``
  (their probabilities averaged: the usual ensemble, a mixture that never does much worse than
  the best member), both D× the compute.
Every arm is scored on the same held-out blocks, only on positions ≥ ``PROMPT`` (the first
``PROMPT`` tokens are the "request" the classifier reads). Cost per token: active parameters and
forward FLOPs by ``moelab calc`` (attention included; the classifier's counting is free).

Verdict (:data:`CLAIM`): ``moe`` vs ``swarm_classifier`` held-out loss, lower is better, paired over
seeds (every arm of seed s trains with seed s and is scored on the same held-out blocks), t
interval and test, minimum effect 0.01 nats/token.

Runs stay in this process whatever ``--jobs`` says: scoring a request-level swarm needs every
specialist's logits on the same blocks at once, so the models of a seed must all be in memory.

Budgets: ``smoke`` the smoke preset on the built-in corpus (7 domains); ``full`` ``FULL_STEPS``
steps of ``tiny`` on ../shared/corpus (4 domains): 16 minutes on 2 threads for 3 seeds.

Legend: B batch, D domains (specialists), E experts, P prompt tokens, S positions, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.calc import arch_from_config, count, flops_per_token
from moelab.config import IGNORE_INDEX, ModelConfig, MoEConfig, RunConfig
from moelab.data.loader import Batch, DataSplits, PackedData, evenly_spaced
from moelab.data.prepare import PreparedData
from moelab.model.twins import dense_twin
from moelab.stats import Rule
from moelab.studies import plots
from moelab.studies.arms import budget_numbers, summarise_budgets
from moelab.studies.base import (
    SCORES,
    STUDIES,
    ArmClaim,
    Scored,
    StudyResult,
    arm_summary,
    base_run,
    data_label,
    mean_std,
)

FULL_STEPS = 1000  # past the MoE–dense crossover (≈600 steps)
SEED_SHARE = 0.5  # the shared seed phase's share of the steps; the branches train the rest
PROMPT = 32  # tokens of a request the classifier reads; losses count the positions after them
MIN_SHARE = 0.05  # a domain gets a specialist when it holds this share of the training blocks
ARMS = ("moe", "dense_general", "swarm_classifier", "swarm_oracle", "swarm_logit_avg", "swarm_prob_avg")

# The claim, declared before any run. Minimum effect 0.01 nats/token (1% in perplexity): a smaller loss
# gap is no reason to prefer token-level routing over a swarm of dense models.
CLAIM = ArmClaim(
    Rule("val_loss", lower_is_better=True, min_effect=0.01, alpha=0.05, paired=True), "moe", ("swarm_classifier",)
)


def block_domains(split: PackedData) -> Tensor:
    """Majority ``domain`` label of each block: ``[num_blocks]`` ids into ``label_names["domain"]``."""
    L = split.seq_len + 1
    ids = split.label_ids_N["domain"][: split.num_blocks * L].view(split.num_blocks, L).long()
    return torch.mode(ids, dim=1).values


class NaiveBayesClassifier:
    """Multinomial naive Bayes over token ids (add-one smoothing): the request-level router.

    ``log p(d | x) ∝ log p(d) + Σ_t log p(x_t | d)``, with ``p(x_t | d)`` the domain's token
    frequencies in the training blocks. ``log_probs_DV``: ``[D, V]``; ``log_prior_D``: ``[D]``.
    """

    def __init__(self, split: PackedData, domains: Tensor, classes: list[int], vocab_size: int) -> None:
        L = split.seq_len + 1
        tokens = split.tokens_N[: split.num_blocks * L].view(split.num_blocks, L).long()
        counts = torch.stack([torch.bincount(tokens[domains == d].reshape(-1), minlength=vocab_size) for d in classes])
        counts = counts.double() + 1.0
        self.classes = classes
        self.log_probs_DV = (counts / counts.sum(1, keepdim=True)).log()
        blocks = torch.tensor([int((domains == d).sum()) for d in classes], dtype=torch.float64)
        self.log_prior_D = (blocks / blocks.sum()).log()

    def predict(self, ids_BP: Tensor) -> list[int]:
        """Domain ids (from ``classes``) of each row's tokens ``[B, P]``."""
        scores_BD = self.log_probs_DV[:, ids_BP].sum(-1).T + self.log_prior_D
        return [self.classes[i] for i in scores_BD.argmax(-1).tolist()]


def experts_for_total(moe_cfg: ModelConfig, target_total: float) -> int:
    """The number of experts whose MoE total (embedding included) is closest to ``target_total``."""

    def total(e: int) -> int:
        cfg = replace(moe_cfg, moe=replace(moe_cfg.moe, num_experts=e))
        return count(arch_from_config(cfg)).total

    top_k = moe_cfg.moe.top_k if moe_cfg.moe else 1
    return min(range(top_k, 257), key=lambda e: abs(total(e) - target_total))


@torch.no_grad()
def token_nll(logits_BSV: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-token NLL ``[B, S]`` and the mask of scored positions (``≥ PROMPT``, not ignored)."""
    labels = batch.labels
    nll = F.cross_entropy(logits_BSV.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels != IGNORE_INDEX
    mask[:, :PROMPT] = False
    return nll, mask


@torch.no_grad()
def logits_of(model: nn.Module, batch: Batch) -> Tensor:
    model.eval()
    return model(batch.input_ids).logits.float()


def _domain_data(data: PreparedData, idx: list[int]) -> PreparedData:
    return PreparedData(data.tokenizer, DataSplits(train=data.splits.train.subset(idx), val=data.splits.val), data.num_documents)


def _train(
    base: RunConfig, name: str, model_cfg: ModelConfig, data: PreparedData, seed: int, out: Path, batch: int,
    steps: int | None = None, lr: float | None = None, init: nn.Module | None = None,
):  # fmt: skip
    """Train one model of the study (``steps``/``lr`` default to the base run's; ``init``: start from
    that model's weights instead of a seeded random init)."""
    from moelab.experiment.run import train_run
    from moelab.train.init import InitSource

    steps = steps or base.train.steps
    train = replace(
        base.train, seed=seed, batch_size=batch, steps=steps, lr=lr or base.train.lr,
        warmup_steps=min(base.train.warmup_steps, max(1, steps // 4)),
    )  # fmt: skip
    run = replace(base, name=name, model=model_cfg, train=train)
    source = None if init is None else InitSource.of_model(f"{name}-seed-model", model_cfg, init, data.tokenizer)
    return train_run(run, out / name / f"seed{seed}", data=data, init=source)


def swarm_budget(moe, general, seed_model, specialists: list) -> dict[str, dict[str, float]]:
    """One seed's training budget per trained system (each argument a finished run's record): the MoE,
    the general dense model, and the swarm as a whole (seed model then the specialists: steps along one
    specialist's path, tokens and FLOPs of all, active parameters of one specialist, total of all)."""
    parts = [budget_numbers(r) for r in (seed_model, *specialists)]
    spec = parts[1]
    swarm = {
        "steps": parts[0]["steps"] + spec["steps"],
        "tokens": sum(p["tokens"] for p in parts),
        "train_flops": sum(p["train_flops"] for p in parts),
        "params_active": spec["params_active"],
        "params_total": spec["params_total"] * len(specialists),
    }
    swarm["tokens_per_active_param"] = swarm["tokens"] / max(swarm["params_active"], 1.0)
    return {"moe": budget_numbers(moe), "dense_general": budget_numbers(general), "swarm": swarm}


def branch_lr(lr: float, batch: int, branch_batch: int) -> float:
    """The learning rate of a branch trained at ``branch_batch`` rows where the seed model took
    ``batch``: square-root scaling (Adam's rate ∝ sqrt(batch), Malladi et al. 2022)."""
    return lr * math.sqrt(branch_batch / batch)


def _score(
    val: list[Batch], val_domains: list[Tensor], models: dict[str, nn.Module], specialists: dict[int, nn.Module],
    classifier: NaiveBayesClassifier,
) -> tuple[dict[str, float], dict[str, dict[str, float]], float]:
    """Held-out loss of every arm, per block domain too, and the classifier's accuracy."""
    sums = {a: [0.0, 0] for a in ARMS}
    by_domain: dict[str, dict[int, list[float]]] = {a: {} for a in ARMS}
    correct = total = 0
    for batch, dom_B in zip(val, val_domains):
        spec_logits = {d: logits_of(m, batch) for d, m in specialists.items()}
        chosen = classifier.predict(batch.input_ids[:, :PROMPT])
        correct += sum(int(c == t) for c, t in zip(chosen, dom_B.tolist()))
        total += len(chosen)
        oracle = [t if t in specialists else c for c, t in zip(chosen, dom_B.tolist())]
        arm_logits = {
            "moe": logits_of(models["moe"], batch),
            "dense_general": logits_of(models["dense_general"], batch),
            "swarm_classifier": torch.stack([spec_logits[c][b] for b, c in enumerate(chosen)]),
            "swarm_oracle": torch.stack([spec_logits[c][b] for b, c in enumerate(oracle)]),
            "swarm_logit_avg": torch.stack(list(spec_logits.values())).mean(0),
            # the mixture p = mean_d p_d: its log-probabilities serve as logits (already normalised)
            "swarm_prob_avg": torch.stack([x.log_softmax(-1) for x in spec_logits.values()]).logsumexp(0)
            - math.log(len(spec_logits)),
        }
        for arm, logits in arm_logits.items():
            nll, mask = token_nll(logits, batch)
            sums[arm][0] += float(nll[mask].double().sum())
            sums[arm][1] += int(mask.sum())
            for b, d in enumerate(dom_B.tolist()):
                acc = by_domain[arm].setdefault(d, [0.0, 0])
                acc[0] += float(nll[b][mask[b]].double().sum())
                acc[1] += int(mask[b].sum())
    loss = {a: s / max(n, 1) for a, (s, n) in sums.items()}
    per_domain = {a: {str(d): s / n for d, (s, n) in sorted(v.items()) if n} for a, v in by_domain.items()}
    return loss, per_domain, correct / max(total, 1)


def _plot(arms: dict, domains: list[str], path: Path) -> None:
    fig, (ax1, ax2) = plots.subplots(1, 2, figsize=(11, 4))
    names = list(arms)
    means = [arms[a]["mean"]["val_loss"] for a in names]
    stds = [arms[a]["std"]["val_loss"] for a in names]
    ax1.bar(range(len(names)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.6)
    plots.seed_points(ax1, [arms[a]["per_seed"]["val_loss"] for a in names])
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylim(min(means) - 0.3, max(means) + 0.2)
    ax1.set_ylabel("held-out loss (mean ± std over seeds; points: seeds)")
    for i, a in enumerate(names):
        ax1.annotate(f"{arms[a]['mean']['fwd_flops_per_token'] / 1e6:.1f} MFLOP", (i, means[i]), fontsize=7,
                     ha="center", va="bottom", xytext=(0, 6), textcoords="offset points")  # fmt: skip
    width = 0.8 / len(names)
    for i, a in enumerate(names):
        cell = arms[a].get("by_label", {}).get("domain", {})
        ax2.bar([j + i * width for j in range(len(domains))], [cell.get(d, {}).get("mean", math.nan) for d in domains],
                width, label=a)  # fmt: skip
    values = [c["mean"] for a in names for c in arms[a].get("by_label", {}).get("domain", {}).values()]
    if values:
        ax2.set_ylim(min(values) - 0.2, max(values) + 0.2)
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax2.set_ylabel("held-out loss by domain")
    ax2.legend(fontsize=7)
    plots.save(fig, path)


@SCORES.register("swarm")
def score(arms: dict[str, Any], numbers: dict[str, Any]) -> Scored:
    return CLAIM.score(arms)


@STUDIES.register("swarm")
def run(budget: str, seeds: list[int], out: Path, jobs: int = 1) -> StudyResult:
    from moelab.experiment.run import prepare

    base, data = prepare(base_run(budget, FULL_STEPS))
    train, val_split = data.splits.train, data.splits.val
    names = train.label_names["domain"]
    train_dom = block_domains(train)
    classes = [d for d in range(len(names)) if int((train_dom == d).sum()) >= max(1, MIN_SHARE * train.num_blocks)]
    D, B = len(classes), base.train.batch_size
    moe_base = replace(base.model, vocab_size=data.tokenizer.vocab_size)
    moe_base = replace(moe_base, moe=moe_base.moe or MoEConfig())
    spec_cfg = dense_twin(moe_base, "iso_active")
    spec_total = count(arch_from_config(spec_cfg)).total
    E = experts_for_total(moe_base, D * spec_total)
    moe_cfg = replace(moe_base, moe=replace(moe_base.moe, num_experts=E))
    spec_batch = max(1, round(B / D))

    # held-out blocks evenly spaced over the split (every domain), each labelled with its domain
    idx = evenly_spaced(val_split.num_blocks, min(val_split.num_blocks, base.train.eval_batches * B))
    val = [val_split.batch(idx[i : i + B]) for i in range(0, len(idx), B)]
    val_dom_all = block_domains(val_split)
    val_domains = [val_dom_all[idx[i : i + B]] for i in range(0, len(idx), B)]
    classifier = NaiveBayesClassifier(train, train_dom, classes, data.tokenizer.vocab_size)
    domain_data = {d: _domain_data(data, torch.nonzero(train_dom == d).reshape(-1).tolist()) for d in classes}

    per_seed: dict[str, dict[str, list[float]]] = {a: {"val_loss": []} for a in ARMS}
    per_domain: dict[str, dict[str, list[float]]] = {a: {} for a in ARMS}
    accuracy: list[float] = []
    tokens: dict[str, list[float]] = {a: [] for a in ("moe", "dense_general", "swarm")}
    budgets: list[dict[str, dict[str, float]]] = []
    steps = base.train.steps
    seed_steps = max(1, round(steps * SEED_SHARE))
    spec_lr = branch_lr(base.train.lr, B, spec_batch)
    for seed in seeds:
        moe_tr = _train(base, "moe", moe_cfg, data, seed, out, B)
        gen_tr = _train(base, "dense_general", spec_cfg, data, seed, out, B)
        seed_tr = _train(base, "swarm_seed_model", spec_cfg, data, seed, out, B, steps=seed_steps)
        spec_tr = {
            d: _train(base, f"specialist_{names[d]}", spec_cfg, domain_data[d], seed, out, spec_batch,
                      steps=steps - seed_steps, lr=spec_lr, init=seed_tr.model)
            for d in classes
        }  # fmt: skip
        tokens["moe"].append(float(moe_tr.tokens))
        tokens["dense_general"].append(float(gen_tr.tokens))
        tokens["swarm"].append(float(seed_tr.tokens + sum(t.tokens for t in spec_tr.values())))
        budgets.append(swarm_budget(moe_tr, gen_tr, seed_tr, list(spec_tr.values())))
        loss, by_dom, acc = _score(
            val, val_domains, {"moe": moe_tr.model, "dense_general": gen_tr.model},
            {d: t.model for d, t in spec_tr.items()}, classifier,
        )  # fmt: skip
        accuracy.append(acc)
        for a in ARMS:
            per_seed[a]["val_loss"].append(loss[a])
            for d, v in by_dom[a].items():
                per_domain[a].setdefault(names[int(d)], []).append(v)

    seq = base.data.seq_len
    moe_arch, spec_arch = arch_from_config(moe_cfg), arch_from_config(spec_cfg)
    cost = {
        "moe": (count(moe_arch).active, count(moe_arch).total, flops_per_token(moe_arch, seq)["forward"]),
        "dense_general": (count(spec_arch).active, count(spec_arch).total, flops_per_token(spec_arch, seq)["forward"]),
    }
    spec_cost = cost["dense_general"]
    cost["swarm_classifier"] = cost["swarm_oracle"] = (spec_cost[0], D * spec_cost[1], spec_cost[2])
    cost["swarm_logit_avg"] = cost["swarm_prob_avg"] = (D * spec_cost[0], D * spec_cost[1], D * spec_cost[2])
    arms = {}
    for a in ARMS:
        n = len(seeds)
        active, total, fwd = cost[a]
        arms[a] = arm_summary(
            {**per_seed[a], "active_params": [float(active)] * n, "total_params": [float(total)] * n,
             "fwd_flops_per_token": [float(fwd)] * n}
        )  # fmt: skip
        arms[a]["by_label"] = {
            "domain": {
                dom: {"per_seed": xs, "mean": mean_std(xs)[0], "std": mean_std(xs)[1]}
                for dom, xs in per_domain[a].items()
                if len(xs) == len(seeds)
            }
        }
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "swarm.png"
    _plot(arms, [names[d] for d in classes], plot)
    acc_m, acc_s = mean_std(accuracy)
    return StudyResult.scored(
        score(arms, {}),
        name="swarm",
        claim=(
            "a token-level MoE reaches lower held-out loss than request-level routing over per-domain dense "
            "models (classifier-picked) at equal total and active parameters"
        ),
        method=(
            f"{D} domain specialists ({', '.join(names[d] for d in classes)}), each the MoE's iso-active dense twin "
            f"branched from one shared seed model (all data, batch {B}, {seed_steps} steps) and trained on its domain's "
            f"blocks with batch {spec_batch} at lr {spec_lr:.3g} (sqrt-scaled) for {steps - seed_steps} steps; an MoE with E={E}, "
            f"k={moe_cfg.moe.top_k} (total ≈ {D} specialists) and one general dense twin, batch {B}, same steps; "
            f"a naive-Bayes classifier reads each held-out block's first {PROMPT} tokens (accuracy "
            f"{acc_m:.3f} ± {acc_s:.2g}); loss on the remaining positions of {len(idx)} held-out blocks"
        ),
        budget=budget,
        seeds=seeds,
        data=data_label(base),
        arms=arms,
        numbers={
            "domains": [names[d] for d in classes],
            "num_experts": E,
            "specialist_batch": spec_batch,
            "classifier_accuracy": accuracy,
            "training_tokens": tokens,
            "prompt_tokens": PROMPT,
            "steps": base.train.steps,
            "seed_steps": seed_steps,
            "specialist_lr": spec_lr,
            "budget_arms": summarise_budgets({arm: [b[arm] for b in budgets] for arm in budgets[0]}),
        },
        plots=[str(plot)],
    )
