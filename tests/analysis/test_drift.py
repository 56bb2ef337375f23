"""Routing drift: identical checkpoints agree fully; independently initialised models near 1/E."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import small_config, synthetic_data

from moelab.analysis.drift import checkpoint_series, checkpoint_step, drift_from_checkpoints, routing_drift
from moelab.checkpoint.folder import checkpoint_name
from moelab.checkpoint.state import save_checkpoint
from moelab.config import DataConfig, MoEConfig, RunConfig
from moelab.data.loader import eval_batches
from moelab.errors import UserError
from moelab.model.transformer import Transformer

E = 8


def _model(seed):
    torch.manual_seed(seed)
    return Transformer(small_config(MoEConfig(num_experts=E, top_k=2, expert_hidden=16))).eval()


def test_identical_checkpoints_drift_is_one():
    data, _ = synthetic_data(4)
    batches = eval_batches(data, 8, 4)
    m = _model(0)
    res = routing_drift([(0, m), (10, copy.deepcopy(m))], batches)
    assert res["steps"] == [0, 10]
    for shares in res["layers"].values():
        assert shares == [1.0, 1.0]


def test_independent_models_agree_near_chance():
    data, _ = synthetic_data(4)
    batches = eval_batches(data, 8, 8)
    res = routing_drift([(0, _model(1)), (1, _model(2)), (2, _model(3))], batches)
    for shares in res["layers"].values():
        for s in shares[:-1]:
            assert 0.5 / E < s < 2.0 / E


def test_drift_from_checkpoint_folders(tmp_path):
    data, tok = synthetic_data(4)
    batches = eval_batches(data, 8, 2)
    run = RunConfig(model=_model(0).cfg, data=DataConfig(tokenizer="bytes", seq_len=32))
    a, b = _model(0), _model(1)
    for step, m in ((20, b), (5, a)):  # saved out of order: the series sorts by step
        save_checkpoint(tmp_path / "run" / "checkpoints" / checkpoint_name(step), m, run, tok, train_state={"step": step})
    series = checkpoint_series([tmp_path / "run"])
    assert [s for s, _ in series] == [5, 20]
    assert checkpoint_step(series[0][1]) == 5
    res = drift_from_checkpoints([tmp_path / "run"], batches)
    direct = routing_drift([(5, a), (20, b)], batches)
    assert res["layers"].keys() == direct["layers"].keys()
    for layer, values in direct["layers"].items():  # pytest >= 9.2 refuses approx on nested containers
        assert res["layers"][layer] == pytest.approx(values)
    assert res["num_experts"] == E
    with pytest.raises(UserError, match="does not exist"):
        checkpoint_series([tmp_path / "nope"])
