"""Checkpoints: exact round trip, atomic layout, damaged ones skipped, pickles refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from moelab.checkpoint.folder import MARKER, checkpoint_name, latest_checkpoint, prune_checkpoints
from moelab.checkpoint.state import load_training_state, save_checkpoint
from moelab.config import DataConfig, RunConfig
from moelab.convert.load import load_model
from moelab.data.tokenizer import BytesTokenizer
from moelab.errors import UserError
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


def _setup(tmp_path, steps=(1, 2)):
    cfg = RunConfig(model=tiny_config(vocab_size=259, moe=tiny_moe()), data=DataConfig(seq_len=32))
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 259, (2, 8))
    paths = []
    for step in steps:
        model(ids, labels=ids).total_loss.backward()
        opt.step()
        opt.zero_grad()
        paths.append(
            save_checkpoint(tmp_path / "checkpoints" / checkpoint_name(step), model, cfg, BytesTokenizer(), opt, {"step": step})
        )
    return cfg, model, opt, paths


def test_round_trip_is_exact(tmp_path) -> None:
    cfg, model, opt, (_p1, p2) = _setup(tmp_path)
    assert sorted(f.name for f in p2.iterdir()) == sorted(
        [MARKER, "model.safetensors", "config.yaml", "tokenizer.json", "state.safetensors", "state.json"]
    )
    loaded, tok = load_model(tmp_path)  # a run folder → newest complete checkpoint
    assert tok.vocab_size == 259 and not loaded.training
    assert loaded.cfg == cfg.model
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed.weight  # tying survives
    model2 = Transformer(cfg.model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    torch.manual_seed(123)
    expected_rng = torch.get_rng_state()
    torch.manual_seed(0)
    state = load_training_state(p2, model2, opt2)
    assert state == {"step": 2}
    a, b = opt.state_dict(), opt2.state_dict()
    for idx in a["state"]:
        for key in a["state"][idx]:
            assert torch.equal(a["state"][idx][key], b["state"][idx][key])
    assert a["param_groups"] == b["param_groups"]
    assert not torch.equal(torch.get_rng_state(), expected_rng)  # restored the saved state, not this one


def test_truncated_or_unmarked_checkpoints_are_skipped(tmp_path) -> None:
    _, _, _, (p1, p2) = _setup(tmp_path)
    weights = p2 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match="truncated"):
        assert latest_checkpoint(tmp_path) == p1
    (p1 / MARKER).unlink()
    with pytest.warns(UserWarning) as caught:
        assert latest_checkpoint(tmp_path) is None
    messages = " | ".join(str(w.message) for w in caught)
    assert "truncated" in messages and "no completion marker" in messages
    with pytest.raises(UserError, match="not usable"):
        load_model(p1)


def test_pickles_are_refused(tmp_path) -> None:
    _, model, _, (p1,) = _setup(tmp_path, steps=(1,))
    ckpt = tmp_path / "foreign"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    with pytest.raises(UserError, match="never loads pickles"):
        load_model(ckpt)
    # a pickle renamed to .safetensors with a forged marker is still refused, before any unpickling
    weights = p1 / "model.safetensors"
    weights.write_bytes(pickle.dumps({"evil": 1}))
    (p1 / MARKER).unlink()
    (p1 / MARKER).write_text("{}")
    from moelab.checkpoint.state import load_weights

    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(model, p1)


def test_prune_keeps_the_newest(tmp_path) -> None:
    _setup(tmp_path, steps=(1, 2, 3))
    (tmp_path / "checkpoints" / ".tmp-step_00000004-999999").mkdir()
    prune_checkpoints(tmp_path, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [checkpoint_name(2), checkpoint_name(3)]


def test_load_model_streams_in_the_requested_dtype(tmp_path) -> None:
    """bf16: every tensor the fp32 one rounded once, routers and RoPE frequencies fp32; default stays fp32."""
    from moelab.infer.fast_decode import cast_for_decode

    _, model, _, _ = _setup(tmp_path, steps=(1,))
    model.eval()
    default, _ = load_model(tmp_path)
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    loaded, _ = load_model(tmp_path, dtype="bf16")
    ref = model.state_dict()
    for name, t in loaded.state_dict().items():
        router = ".router." in name
        assert t.dtype == (torch.float32 if router else torch.bfloat16), name
        assert torch.equal(t, ref[name].to(t.dtype)), name
    assert loaded.lm_head.weight is loaded.embed.weight and loaded.rope.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.rope.inv_freq, model.rope.inv_freq)
    # the same model as the decode path's cast (fp32 routers from the fp32 weights, fp32 RoPE): bit for bit
    cast = cast_for_decode(model, torch.bfloat16, pack=False)
    ids = torch.randint(0, 259, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, cast(ids).logits)


def test_non_finite_weights_are_found_across_chunks(tmp_path, monkeypatch) -> None:
    import moelab.checkpoint.folder as ck

    _, model, _, _ = _setup(tmp_path, steps=(1,))
    monkeypatch.setattr(ck, "NONFINITE_CHUNK", 7)
    with torch.no_grad():
        model.blocks[1].ffn.experts.w_down.view(-1)[-1] = float("nan")
        model.blocks[1].ffn.experts.w_down.view(-1)[30] = float("inf")
    save_checkpoint(tmp_path / "bad", model, RunConfig(model=model.cfg, data=DataConfig(seq_len=32)), BytesTokenizer())
    with pytest.raises(UserError, match=r"'blocks\.1\.ffn\.experts\.w_down' holds 2 of \d+ values that are NaN"):
        load_model(tmp_path / "bad")


def test_memory_guard_counts_the_load_dtype(monkeypatch) -> None:
    """A model whose fp32 weights exceed free memory but whose bf16 weights fit is not refused in bf16."""
    from moelab.hardware import AvailableMemory
    from moelab.model import memory_guard
    from moelab.model.sizes import parameter_count

    cfg = tiny_config(vocab_size=259, moe=tiny_moe())
    free = parameter_count(cfg) * 3  # between bf16 (2 bytes a parameter) and fp32 (4)
    monkeypatch.setattr(memory_guard, "available_memory", lambda device: AvailableMemory(free, "test"))
    memory_guard.require_fits(cfg, "cpu", torch.bfloat16)
    memory_guard.require_fits(cfg, "meta")  # nothing is allocated on meta
    with pytest.raises(memory_guard.ModelTooLargeError, match="of float32 weights"):
        memory_guard.require_fits(cfg, "cpu")
    with pytest.raises(memory_guard.ModelTooLargeError, match="of float32 weights"):
        memory_guard.require_fits(cfg, "cpu", torch.float32)
