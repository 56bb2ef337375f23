"""Routing drift ("early routing learning", OpenMoE; seeds/004): when does routing settle?

OpenMoE found that token→expert assignments are fixed early in training (the router first
learns to balance, before the model has high-level semantics), so later training rarely moves
a token to another expert. The measure: for a series of checkpoints of one run and the same
tokens, the share of tokens whose top-1 expert equals the *final* checkpoint's, per MoE layer,
against the training step. 1.0 at the end by construction; a curve that reaches ~1 early means
routing froze early. Two unrelated routers agree on about Σ_e p_e q_e ≈ 1/E of tokens (the
chance level, drawn in the plot).

Legend: N tokens, E experts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data.loader import Batch
from moelab.errors import UserError


@torch.no_grad()
def top1_by_layer(model: torch.nn.Module, batches: Sequence[Batch]) -> dict[int, np.ndarray]:
    """``{layer: [N] top-1 expert by router score}`` over ``batches`` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[int, list[np.ndarray]] = {}
    try:
        for batch in batches:
            routing = model(batch.input_ids.to(device), return_routing=True).routing or {}
            for layer, d in routing.items():
                out.setdefault(layer, []).append(d.scores.argmax(dim=-1).cpu().numpy().astype(np.int16))
    finally:
        model.train(was_training)
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def agreement(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Share of tokens with the same top-1 expert in two passes."""
    if a_N.shape != b_N.shape:
        raise UserError(f"cannot compare routing of {a_N.shape[0]} and {b_N.shape[0]} tokens: use the same data")
    return float((a_N == b_N).mean()) if a_N.size else 1.0


def routing_drift(
    models: Sequence[tuple[int, torch.nn.Module]], batches: Sequence[Batch], progress: bool = False
) -> dict[str, Any]:
    """Agreement of each ``(step, model)`` with the last one, per layer (module doc).

    Returns ``{"steps": [...], "num_experts": E, "layers": {"L": [share per step]}}``.
    """
    from moelab.analysis.progress import progress_iter

    if not models:
        raise UserError("routing drift needs at least one checkpoint")
    tops = [(step, top1_by_layer(m, batches)) for step, m in progress_iter(models, "routing drift", len(models), progress)]
    final = tops[-1][1]
    num_experts = next((m.cfg.moe.num_experts for _, m in models if getattr(m.cfg, "moe", None)), 0)
    layers = {str(layer): [agreement(t[layer], final[layer]) for _, t in tops] for layer in sorted(final)}
    return {"steps": [s for s, _ in tops], "num_experts": num_experts, "layers": layers}


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint folder: ``state.json`` ``train_state.step``, else its name."""
    try:
        step = json.loads((path / "state.json").read_text(encoding="utf-8")).get("train_state", {}).get("step")
        if isinstance(step, int):
            return step
    except (OSError, ValueError):
        pass
    digits = "".join(ch for ch in path.name if ch.isdigit())
    return int(digits) if digits else 0


def checkpoint_series(paths: Sequence[str | Path]) -> list[tuple[int, Path]]:
    """``(step, folder)`` sorted by step: each path a checkpoint, or a run folder (all its checkpoints)."""
    from moelab.checkpoint.folder import MARKER, list_checkpoints

    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"checkpoint {str(p)!r} does not exist")
        if (p / MARKER).exists() or (p / "model.safetensors").exists():
            found.append(p)
        else:
            ckpts = [c for c in list_checkpoints(p) if (c / MARKER).exists()]
            if not ckpts:
                raise UserError(f"{p} holds no complete checkpoint (expected model.safetensors + {MARKER})")
            found.extend(ckpts)
    return sorted(((checkpoint_step(p), p) for p in found), key=lambda sp: sp[0])


def drift_from_checkpoints(
    paths: Sequence[str | Path], batches: Sequence[Batch], progress: bool = False
) -> dict[str, Any]:
    """:func:`routing_drift` over checkpoint folders (loaded one at a time, so memory holds one model)."""
    from moelab.analysis.progress import progress_iter
    from moelab.convert.load import load_model

    series = checkpoint_series(paths)
    tops = []
    num_experts = 0
    for step, path in progress_iter(series, "routing drift", len(series), progress):
        model, _ = load_model(path)
        if model.cfg.moe is not None:
            num_experts = model.cfg.moe.num_experts
        tops.append((step, top1_by_layer(model, batches)))
        del model
    final = tops[-1][1]
    if not final:
        raise UserError("the checkpoints hold no MoE layer: routing drift needs an MoE model")
    layers = {str(layer): [agreement(t[layer], final[layer]) for _, t in tops] for layer in sorted(final)}
    return {"steps": [s for s, _ in tops], "num_experts": num_experts, "layers": layers}
