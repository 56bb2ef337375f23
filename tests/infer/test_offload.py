"""Offloaded experts: token-for-token identical generation (GQA and MLA+MoE models), consistent
statistics, policies."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError
from moelab.errors import UserError
from moelab.infer.generate import SamplingParams, generate
from moelab.infer.offload import (
    LFUPolicy,
    LRUPolicy,
    Offloader,
    PinnedPolicy,
    export_experts,
    parse_capacity,
    routing_counts,
)
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_mla, tiny_moe

PARAMS = [
    SamplingParams(max_new_tokens=12, stop_at_eos=False),
    SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=5, stop_at_eos=False),
]
PROMPTS = [[3, 14, 15, 92, 65, 35], [27, 18, 28]]


ATTENTION = {"gqa": None, "mla": tiny_mla(q_lora_rank=10)}  # MLA: latent KV cache during generation


def _model(attention: str = "gqa", **moe) -> Transformer:
    torch.manual_seed(0)
    cfg = tiny_config(n_layers=3, moe=tiny_moe(num_experts=8, top_k=2, **moe), mla=ATTENTION[attention])
    return Transformer(cfg).eval()


def _expert_bytes(model: Transformer) -> int:
    ex = model.blocks[0].ffn.experts
    return (ex.w_up[0].numel() + ex.w_down[0].numel()) * ex.w_up.element_size()


@pytest.fixture(scope="module", params=sorted(ATTENTION))
def attention(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(attention: str) -> list[list[int]]:
    """In-memory generation of the model with ``attention``."""
    return [c.token_ids for c in generate(_model(attention), PROMPTS, PARAMS)]


@pytest.mark.parametrize("capacity", [1, "25%", "100%"])
@pytest.mark.parametrize(("policy", "prefetch"), [("lru", False), ("lru", True), ("lfu", True), ("pinned", False)])
def test_offloaded_generation_is_identical(attention: str, reference, capacity, policy: str, prefetch: bool) -> None:
    model = _model(attention)
    counts = routing_counts(model, [torch.randint(0, 97, (2, 16))])
    size = _expert_bytes(model)
    off = Offloader(model, capacity, policy, prefetch=prefetch, counts=counts)
    out = [c.token_ids for c in generate(model, PROMPTS, PARAMS)]
    assert out == reference
    s = off.stats
    assert s.lookups > 0 and s.hits + s.misses == s.lookups
    assert s.bytes_moved == s.misses * size and s.prefetch_bytes == s.prefetch_loads * size
    for per in s.by_layer.values():
        assert per.get("hits", 0) + per.get("misses", 0) == per["lookups"]
    assert all(len(c.slots) <= c.capacity for c in off.caches.values())
    assert all(set(c.slots) <= set(c.policy.order) for c in off.caches.values())  # every resident expert can be evicted
    if prefetch:
        assert s.prefetch_loads > 0 or capacity == "100%"
    if capacity == "100%" and policy in ("lru", "lfu"):
        # every expert is loaded at most once
        assert s.misses + s.prefetch_loads <= sum(c.num_experts for c in off.caches.values())


def test_disk_tier_is_identical_and_counts_the_same(attention: str, reference, tmp_path) -> None:
    model = _model(attention)
    path = export_experts(model, tmp_path / "experts.safetensors")
    off = Offloader(model, "25%", "lru", source=path)
    assert [c.token_ids for c in generate(model, PROMPTS, PARAMS)] == reference
    assert off.stats.bytes_moved == off.stats.misses * _expert_bytes(_model())
    assert not any(n.endswith("experts.w_up") for n, _ in model.named_parameters())


@pytest.mark.parametrize("disk", [False, True])
def test_fetch_returns_the_stored_expert_and_leaves_cache_and_counters_alone(disk: bool, tmp_path) -> None:
    """LayerExpertCache.fetch (what the hybrid-inference study times per tier) does a miss's work only."""
    model = _model()
    w_up, w_down = (model.blocks[1].ffn.experts.w_up[5].clone(), model.blocks[1].ffn.experts.w_down[5].clone())
    source = export_experts(model, tmp_path / "experts.safetensors") if disk else None
    off = Offloader(model, "25%", "lru", source=source)
    cache = off.caches[1]
    slots, stats = dict(cache.slots), off.stats.as_dict()
    up, down = cache.fetch(5)
    torch.testing.assert_close(up, w_up, rtol=0, atol=0)
    torch.testing.assert_close(down, w_down, rtol=0, atol=0)
    assert cache.slots == slots and off.stats.as_dict() == stats


def test_full_pinned_cache_never_misses_and_lru_misses_each_expert_once() -> None:
    model = _model()
    counts = {i: [1.0] * 8 for i in range(3)}
    off = Offloader(model, "100%", "pinned", counts=counts)
    generate(model, PROMPTS, PARAMS)
    assert off.stats.misses == 0 and off.stats.hits == off.stats.lookups > 0
    model = _model()
    used = routing_counts(model, [torch.tensor([PROMPTS[0]])])
    distinct = sum(sum(1 for c in layer if c > 0) for layer in used.values())
    off = Offloader(model, "100%", "lru")
    model(torch.tensor([PROMPTS[0]]))
    assert off.stats.misses == distinct
    model(torch.tensor([PROMPTS[0]]))
    assert off.stats.misses == distinct and off.stats.hits == off.stats.lookups - distinct


def test_policies_pick_the_right_victims() -> None:
    lru = LRUPolicy(3, None)
    for e in (4, 1, 7, 4):
        lru.touch(e)
    assert lru.victim({1, 4, 7}, set()) == 1
    assert lru.victim({1, 4, 7}, {1}) == 7
    lru.inserted(2)  # a prefetched expert counts as recent, so it is not the next victim
    assert lru.victim({1, 2, 4, 7}, set()) == 1
    lfu = LFUPolicy(3, [0, 5, 0, 0, 1, 0, 0, 9])
    for e in (4, 1, 7):
        lfu.touch(e)
    assert lfu.victim({1, 4, 7}, set()) == 4  # 1 calibration + 1 use: the fewest
    pinned = PinnedPolicy(2, [0, 5, 0, 0, 1, 0, 0, 9])
    assert pinned.initial() == [7, 1] and pinned.admit(7) and not pinned.admit(4)


def test_capacity_parsing_and_errors() -> None:
    assert parse_capacity("25%", 8) == 2 and parse_capacity("12.5%", 8) == 1 and parse_capacity("1%", 8) == 1
    assert parse_capacity(3, 8) == 3 and parse_capacity("100%", 8) == 8 and parse_capacity(20, 8) == 8
    for bad in ("0%", "150%", "x", 0):
        with pytest.raises(ConfigError, match="expert cache size"):
            parse_capacity(bad, 8)
    with pytest.raises(UserError, match="MoE"):
        Offloader(Transformer(tiny_config()), "25%")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cache_with_side_stream_prefetch_is_identical() -> None:
    reference = [c.token_ids for c in generate(_model().cuda(), PROMPTS, PARAMS)]
    model = _model().cuda()
    off = Offloader(model, "25%", "lru", prefetch=True)
    assert next(iter(off.caches.values())).store.weights[0][0].is_pinned()
    assert [c.token_ids for c in generate(model, PROMPTS, PARAMS)] == reference
    assert off.stats.hits + off.stats.misses == off.stats.lookups


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("disk", [False, True])
def test_native_offloaded_experts_equal_resident_native_experts(dtype: torch.dtype, disk: bool, tmp_path) -> None:
    """``native=True``: fetched experts are packed for moelab's native kernels (memory tier once,
    disk tier after each fetch) and give the tokens and logits of the same model with resident
    native experts; the bytes moved are the plain experts' bytes."""
    from moelab.infer.fast_decode import cast_for_decode
    from moelab.infer.offload import NativeExpertRunner
    from moelab.infer.packed import NativeExperts, native_available, pack_for_decode

    if not native_available():
        pytest.skip("moelab's native kernels do not build here")
    resident = cast_for_decode(_model(), dtype)
    assert isinstance(resident.blocks[0].ffn.experts, NativeExperts)
    model = cast_for_decode(_model(), dtype, pack=False)
    source = export_experts(model, tmp_path / "experts.safetensors") if disk else None
    off = Offloader(model, 2, "lru", source=source, native=True)
    pack_for_decode(model)  # the other linears as the resident copy has them
    assert all(isinstance(b.ffn.experts.runner, NativeExpertRunner) for b in model.blocks if b.is_moe)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, resident(ids).logits, rtol=0, atol=0)
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    assert [c.token_ids for c in generate(model, PROMPTS, params)] == [c.token_ids for c in generate(resident, PROMPTS, params)]
    ex = _model().blocks[0].ffn.experts
    assert off.stats.bytes_moved == off.stats.misses * (ex.w_up[0].numel() + ex.w_down[0].numel()) * torch.finfo(dtype).bits // 8
