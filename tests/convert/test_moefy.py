"""MoEfication: k = E reproduces the dense model; on a trained model clustering beats a random split."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from moelab.config import ModelConfig
from moelab.convert.moefy import balanced_kmeans, lm_loss, moefy, moefy_report
from moelab.model.transformer import Transformer

from helpers import SHARED_CORPUS, tiny_config


def _text() -> bytes:
    """English prose and Python from the shared corpus when present, else the stdlib's own source."""
    path = SHARED_CORPUS / "valid.jsonl.gz"
    text = b""
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if doc["lang"] in ("en", "python"):
                    text += doc["text"].encode()
                if len(text) > 300_000:
                    break
    else:
        for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py")):
            text += p.read_bytes()
    return text


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("router", ["learned", "centroid"])
def test_k_equal_e_reproduces_the_dense_model(activation, router) -> None:
    dense = Transformer(tiny_config(activation=activation)).eval()
    calib = [torch.randint(0, 97, (4, 16))]
    sparse = moefy(dense, calib, num_experts=4, top_k=4, router=router)
    assert sparse.cfg.moe.expert_hidden == 12 and sparse.cfg.moe.router.name == "topk_unweighted"
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.allclose(sparse(ids).logits, dense(ids).logits, atol=1e-5)
    # each neuron sits in exactly one expert: the down-projection columns are a permutation of the dense ones
    cols = sparse.blocks[0].ffn.experts.w_down.detach().permute(1, 0, 2).reshape(32, -1)
    dense_cols = dense.blocks[0].ffn.w_down.weight.detach()
    assert torch.equal(cols.sort(dim=1).values, dense_cols.sort(dim=1).values)


def test_balanced_kmeans_is_balanced_and_finds_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 5
    feats = torch.cat([centers[c] + 0.1 * torch.randn(6, 10, generator=g) for c in range(4)])
    labels = balanced_kmeans(feats, 4)
    assert torch.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    for c in range(4):  # rows from one true cluster share a label
        assert len(set(labels[6 * c : 6 * c + 6].tolist())) == 1


@pytest.mark.slow
def test_clustered_split_beats_random_split_on_a_trained_model() -> None:
    torch.manual_seed(0)
    data = torch.tensor(list(_text()))
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, ffn_hidden=192, max_seq_len=48)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    g = torch.Generator().manual_seed(1)

    def batch(n: int) -> torch.Tensor:
        idx = torch.randint(0, len(data) - 49, (n,), generator=g)
        return torch.stack([data[i : i + 48] for i in idx])

    for _ in range(200):  # long enough for neurons to specialise (100 steps left the two splits within noise)
        ids = batch(16)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    calib, evaluation = [batch(16) for _ in range(4)], [batch(16) for _ in range(4)]
    dense = lm_loss(model, evaluation)
    clustered = moefy_report(model, calib, evaluation, 8, [2, 8], split="cluster")
    randomised = moefy_report(model, calib, evaluation, 8, [2, 8], split="random")
    assert clustered[1].loss == pytest.approx(dense, abs=1e-4)  # k = E: the dense model
    assert clustered[0].loss > dense  # k < E loses something ...
    assert clustered[0].loss < randomised[0].loss  # ... and less with co-activation clusters
