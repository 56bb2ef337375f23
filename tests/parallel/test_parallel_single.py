"""Single-process checks of the parallel code: world 1 must equal the plain path exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.model.transformer import Transformer
from moelab.moe.dispatch import DISPATCHERS
from moelab.moe.dispatch.ep import ep_dispatch
from moelab.moe.dispatch.loop import loop_dispatch
from moelab.moe.experts import Experts
from moelab.parallel import (
    DATA_PARALLEL,
    ExpertShard,
    build_layout,
    init_distributed,
    shard_experts,
    shard_rows,
)
from moelab.parallel.env import DistEnv, describe_failure
from moelab.parallel.expert_parallel import full_state_dict, load_full_state_dict
from moelab.parallel.mesh import ParallelLayout, check_layout

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as workers


@pytest.mark.parametrize(
    "case,capacity", [("random", None), ("one_expert", None), ("empty_expert", None), ("random", 0.5)]
)
def test_ep_dispatch_without_group_equals_loop(case, capacity):
    experts = Experts(4, 16, 8, "gelu")
    x = torch.randn(10, 16, requires_grad=True)
    dec, logits = workers.make_decision(case, 10, 4, 2, torch.Generator().manual_seed(3), capacity)
    cot = torch.randn(10, 16)
    ref = loop_dispatch(x, dec, experts)
    grads_ref = torch.autograd.grad(
        (ref * cot).sum(), (x, logits, experts.w_up, experts.w_down), retain_graph=True
    )
    got = ep_dispatch(x, dec, experts)
    grads = torch.autograd.grad((got * cot).sum(), (x, logits, experts.w_up, experts.w_down))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
    if capacity is not None:
        assert not bool(dec.kept.all()), "the capacity case must actually drop something"


def test_ep_is_a_registered_dispatch_backend():
    assert DISPATCHERS["ep"] is ep_dispatch


def test_layout_checks_name_the_flag():
    assert check_layout(4, 2, 8) == 2
    with pytest.raises(ConfigError, match="--ep 3 does not divide the world size 4"):
        check_layout(4, 3, 6)
    with pytest.raises(ConfigError, match=r"moe\.num_experts=6"):
        check_layout(4, 4, 6)


def test_world_one_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed()
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)
    layout = build_layout(env, ep=1, num_experts=4)
    assert (layout.dp, layout.ep, layout.ep_group) == (1, 1, None)


def test_shard_rows_split_the_global_batch_without_overlap():
    rows = []
    for rank in range(4):
        layout = ParallelLayout(env=DistEnv(rank=rank, world_size=4), dp=2, ep=2)
        rows.extend(range(16)[shard_rows(16, layout)])
    assert rows == list(range(16))
    with pytest.raises(UserError, match="multiple of 4"):
        shard_rows(10, ParallelLayout(env=DistEnv(rank=0, world_size=4), dp=4, ep=1))


def test_failure_messages_say_which_rank_and_why():
    own = describe_failure(UserError("labels outside the vocabulary"), 1, 4)
    assert own == "moelab: rank 1 of 4 failed: UserError: labels outside the vocabulary"
    peer = describe_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1"), 0, 4)
    assert peer.startswith("moelab: rank 0 of 4 stopped: a collective failed") and "another rank" in peer


def test_unsharded_state_dict_round_trip_at_world_one():
    torch.manual_seed(0)
    plain = Transformer(workers.model_config())
    torch.manual_seed(1)
    sharded = Transformer(workers.model_config())
    shard_experts(sharded, None)
    assert all(isinstance(layer.experts, ExpertShard) for layer in sharded.moe_layers)
    load_full_state_dict(sharded, plain.state_dict())
    state = full_state_dict(sharded)
    assert state.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(state[name], value), name
    ids = torch.randint(0, workers.VOCAB, (2, workers.SEQ))
    torch.testing.assert_close(sharded(ids).logits, plain(ids).logits, atol=1e-6, rtol=0)


def test_world_one_train_step_equals_plain_adamw():
    """The library step at world 1 (any data-parallel mode) is the plain single-process loop."""
    layout = build_layout(DistEnv(), ep=1, num_experts=4)
    for mode in DATA_PARALLEL:
        torch.manual_seed(0)
        model = Transformer(workers.model_config())
        losses = workers.run_steps(model, None, layout, mode, range(2))
        ref_model, _, ref_losses = workers.reference_run(1, range(2))
        assert losses == pytest.approx(ref_losses, abs=1e-6), mode
        for name, p in ref_model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], p, atol=1e-6, rtol=0)
