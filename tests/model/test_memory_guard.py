"""The memory guard: models and training runs bigger than free memory are refused before any
allocation, with one line and an override. Free memory is patched small, so no test allocates
more than a tiny model."""

from __future__ import annotations

import pytest
import torch

from moelab import hardware
from moelab.hardware import AvailableMemory
from moelab.model import memory_guard
from moelab.model.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from moelab.model.memory_guard import ALLOW_ENV, ModelTooLargeError, require_fits, require_training_fits
from moelab.model.sizes import parameter_count, training_bytes
from moelab.model.transformer import Transformer

from helpers import tiny_config, tiny_moe


@pytest.fixture
def free_bytes(monkeypatch):
    """Set the free memory the guard sees: ``free_bytes(n)``."""
    monkeypatch.delenv(ALLOW_ENV, raising=False)

    def set_free(n: int) -> None:
        monkeypatch.setattr(memory_guard, "available_memory", lambda device="cpu": AvailableMemory(n, "test"))

    return set_free


CFG = tiny_config(moe=tiny_moe())


def test_builders_refuse_a_model_bigger_than_free_memory(free_bytes) -> None:
    need = parameter_count(CFG) * 4
    free_bytes(need - 1)
    with pytest.raises(ModelTooLargeError) as exc:
        Transformer(CFG)
    msg = str(exc.value)
    assert "\n" not in msg and f"{parameter_count(CFG):,} parameters" in msg and ALLOW_ENV in msg
    enc_dec = EncoderDecoderConfig.from_model(CFG)
    free_bytes(parameter_count(enc_dec) * 4 - 1)
    with pytest.raises(ModelTooLargeError):
        EncoderDecoder(enc_dec)


def test_a_model_that_fits_is_built(free_bytes) -> None:
    free_bytes(parameter_count(CFG) * 4)
    assert sum(p.numel() for p in Transformer(CFG).parameters()) == parameter_count(CFG)


def test_the_override_lets_a_large_model_through(free_bytes, monkeypatch) -> None:
    free_bytes(1)
    monkeypatch.setenv(ALLOW_ENV, "1")
    Transformer(CFG)
    require_training_fits(CFG, tokens=10**6)
    monkeypatch.setenv(ALLOW_ENV, "0")  # "0" means off
    with pytest.raises(ModelTooLargeError):
        Transformer(CFG)


def test_unknown_free_memory_skips_the_check(monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.setattr(memory_guard, "available_memory", lambda device="cpu": None)
    require_fits(CFG)
    require_training_fits(CFG, tokens=10**9)


def test_impossible_sizes_are_refused_on_any_machine() -> None:
    """10⁸ experts and d_model 10⁶ (petabytes each): the real free memory, no patching; the builder
    refuses before its first tensor."""
    huge_moe = tiny_config(moe=tiny_moe(num_experts=10**8, expert_hidden=10**5))
    wide = tiny_config(d_model=10**6, n_heads=4, n_kv_heads=2, ffn_hidden=10**8)
    for cfg in (huge_moe, wide):
        assert parameter_count(cfg) * 4 > 2**50  # more than any machine's memory: a PiB
        with pytest.raises(ModelTooLargeError, match="parameters"):
            Transformer(cfg)


def test_training_check_counts_weights_gradients_moments_and_activations(free_bytes) -> None:
    need = training_bytes(CFG, tokens=64, activation_bytes=4).total
    free_bytes(need)
    require_training_fits(CFG, tokens=64)
    free_bytes(need - 1)
    with pytest.raises(ModelTooLargeError, match=r"AdamW moments .* activations of 64 tokens"):
        require_training_fits(CFG, tokens=64)


def test_meminfo_parsing_and_the_real_reading() -> None:
    text = "MemTotal:       16000 kB\nMemFree:  100 kB\nMemAvailable:   12345 kB\n"
    assert hardware._meminfo_available(text) == 12345 * 1024
    assert hardware._meminfo_available("MemTotal: 1 kB\n") is None
    # a container: its limit minus what it uses, inactive page cache counted as room
    assert hardware.cgroup_room("1000", 900, "anon 500\ninactive_file 300\n", "inactive_file") == 400
    assert hardware.cgroup_room("1000", 1200, "", "inactive_file") == 0
    assert hardware.cgroup_room("max", 900, "", "inactive_file") is None
    assert hardware.cgroup_room(str(2**63 - 4096), 900, "", "total_inactive_file") is None  # v1: no limit
    free = hardware.available_memory("cpu")
    assert free is None or free.bytes > 0
    assert hardware.available_memory("meta") is None


def test_meta_device_models_are_not_checked(free_bytes) -> None:
    free_bytes(1)
    with torch.device("meta"):
        model = Transformer(CFG)
    assert next(model.parameters()).is_meta
