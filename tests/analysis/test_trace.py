"""Traces: what is recorded equals the model's decisions; chunking changes nothing; bad folders refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import small_config, synthetic_data

from moelab.analysis import Trace, TraceWriter, collect
from moelab.config import MoEConfig
from moelab.data.loader import eval_batches
from moelab.errors import UserError
from moelab.model.transformer import Transformer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data, _ = synthetic_data(4)
    model = Transformer(small_config(MoEConfig(num_experts=4, top_k=2, expert_hidden=24))).eval()
    return data, model


def test_trace_matches_decisions(setup, tmp_path):
    data, model = setup
    batches = eval_batches(data, 4, 3)
    trace = collect(model, batches, tmp_path / "t", label_names=data.label_names)
    assert trace.num_tokens == sum(b.input_ids.numel() for b in batches)
    ids = torch.cat([b.input_ids.reshape(-1) for b in batches]).numpy()
    np.testing.assert_array_equal(trace.array("token"), ids)
    np.testing.assert_array_equal(trace.array("doc"), torch.cat([b.doc_ids.reshape(-1) for b in batches]).numpy())
    dom = torch.cat([b.label_ids["domain"].reshape(-1) for b in batches]).numpy()
    np.testing.assert_array_equal(trace.array("label.domain"), dom)
    np.testing.assert_array_equal(trace.array("position"), np.tile(np.arange(data.seq_len), 12))
    offset = 0
    with torch.no_grad():
        for b in batches:
            routing = model(b.input_ids, return_routing=True).routing
            T = b.input_ids.numel()
            for layer, d in routing.items():
                la = trace.layer(layer)
                sel = (la["a_token"] >= offset) & (la["a_token"] < offset + T)
                np.testing.assert_array_equal(la["a_token"][sel] - offset, d.token.numpy())
                np.testing.assert_array_equal(la["a_expert"][sel], d.expert.numpy())
                np.testing.assert_array_equal(la["a_kept"][sel].astype(bool), d.kept.numpy())
                np.testing.assert_allclose(la["a_weight"][sel], d.weight.numpy(), atol=1e-3)
                np.testing.assert_array_equal(la["top1"][offset : offset + T], d.scores.argmax(-1).numpy())
            offset += T
    assert trace.meta["top_k"] == 2 and trace.num_experts == 4 and trace.layers == [0, 1]
    assert trace.label_names["domain"] == data.label_names["domain"]


def test_chunking_is_invisible(setup, tmp_path):
    data, model = setup
    one = collect(model, data, tmp_path / "one", batch_size=4, max_tokens=4 * 32 * 5, chunk_tokens=10**9)
    many = collect(model, data, tmp_path / "many", batch_size=4, max_tokens=4 * 32 * 5, chunk_tokens=100)
    assert len(one.meta["chunks"]) == 1 and len(many.meta["chunks"]) == 5
    for key in one.names():
        np.testing.assert_array_equal(one.array(key), many.array(key))


def test_writer_refuses_inconsistent_input(setup, tmp_path):
    data, model = setup
    b = data.batch([0, 1])
    with TraceWriter(tmp_path / "w") as tw:
        with pytest.raises(UserError, match="no routing"):
            tw.record({}, b)
        routing = model(b.input_ids, return_routing=True).routing
        with pytest.raises(UserError, match="routed"):
            tw.record(routing, data.batch([0]))


def test_load_refuses_non_traces(tmp_path):
    with pytest.raises(UserError, match="not a routing trace"):
        Trace.load(tmp_path)
    (tmp_path / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(UserError, match="format"):
        Trace.load(tmp_path)


def test_progress_bar_does_not_change_the_trace(setup, tmp_path):
    data, model = setup
    quiet = collect(model, data, tmp_path / "q", batch_size=4, max_tokens=4 * 32 * 3)
    loud = collect(model, data, tmp_path / "l", batch_size=4, max_tokens=4 * 32 * 3, progress=True)
    assert quiet.num_tokens == loud.num_tokens == 4 * 32 * 3
    np.testing.assert_array_equal(quiet.array("0.top1"), loud.array("0.top1"))
