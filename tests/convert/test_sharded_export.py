"""Sharded, streamed export (issue 26): ``model-0000i-of-0000n.safetensors`` + index that transformers loads,
written tensor by tensor from a plan; and the safetensors writer itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from convert.hf_cases import FAMILY_CASES, SEQ2SEQ_CASES, V, tiny_hf_model, tiny_seq2seq
from moelab.cli import main
from moelab.convert.hf import export_hf, import_hf, save_moelab
from moelab.errors import UserError
from moelab.safetensors_writer import Planned, parse_size, shard_plan, write_safetensors

LIMIT = 6_000  # bytes: several shards for every tiny model


def _theirs(kind: str):
    return tiny_seq2seq(kind) if kind in SEQ2SEQ_CASES else tiny_hf_model(kind)


def _logits(model, ids, dec):
    with torch.no_grad():
        return (model(ids, decoder_input_ids=dec) if dec is not None else model(ids)).logits.float()


@pytest.mark.parametrize("kind", FAMILY_CASES + SEQ2SEQ_CASES)
def test_sharded_export_round_trips_through_transformers(kind, tmp_path) -> None:
    theirs = _theirs(kind)
    theirs.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    hf_type = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    export_hf(ours, tmp_path / "out", family=hf_type, max_shard_size=LIMIT)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "out" / "model.safetensors").exists()
    stored = {}
    for name in shards:
        part = load_file(tmp_path / "out" / name)
        one_tensor = len(part) == 1
        assert one_tensor or sum(t.numel() * t.element_size() for t in part.values()) <= LIMIT, name
        stored.update({k: (name, t) for k, t in part.items()})
    assert index["weight_map"] == {k: name for k, (name, _) in stored.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in stored.values())

    auto = AutoModelForSeq2SeqLM if kind in SEQ2SEQ_CASES else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 9), generator=g)
    dec = torch.randint(0, V, (2, 5), generator=g) if kind in SEQ2SEQ_CASES else None
    assert torch.allclose(_logits(reloaded, ids, dec), _logits(theirs, ids, dec), atol=1e-4, rtol=0)
    again = import_hf(tmp_path / "out")  # and back through moelab's streamed reader, bit for bit
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_export_keeps_its_dtype_and_one_file_needs_no_index(tmp_path) -> None:
    tiny_hf_model("mixtral").save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf", dtype="bf16")
    export_hf(ours, tmp_path / "out")  # default 5GB: one file
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert {k for k, t in stored.items() if t.dtype != torch.bfloat16} == {
        k for k in stored if k.endswith("block_sparse_moe.gate.weight")
    }  # routers are kept fp32, the rest as the model holds it
    back = import_hf(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_convert_cli_dtype_and_max_shard_size(tmp_path, capsys) -> None:
    tiny_hf_model("qwen2_moe").save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ml"), "--dtype", "bf16"]) == 0
    ml = load_file(tmp_path / "ml" / "model.safetensors")
    assert ml["embed.weight"].dtype == torch.bfloat16
    argv = ["convert", str(tmp_path / "ml"), str(tmp_path / "out"), "--max-shard-size", "5KB"]
    assert main(argv) == 0
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    # a folder of shards is a model folder moelab wrote: --overwrite replaces it (one file this time)
    assert main([*argv[:3], "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    capsys.readouterr()
    assert main([*argv[:3], "--overwrite", "--max-shard-size", "lots"]) == 2
    assert "max shard size 'lots' is invalid" in capsys.readouterr().err


def test_writer_round_trips_every_dtype_without_a_copy(tmp_path) -> None:
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(12, dtype=torch.int64).reshape(3, 4)[:, 1:],  # not contiguous
        "c": torch.tensor([True, False, True]),
        "d": torch.empty(0, 4),
        "e": torch.randn(7, dtype=torch.float16),
        "f": torch.tensor(2.5),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors.items(), metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


def test_shard_plan_and_sizes() -> None:
    plan = [Planned(n, torch.float32, (s,)) for n, s in (("a", 10), ("b", 10), ("c", 40), ("d", 5))]
    assert [[p.name for p in s] for s in shard_plan(plan, 80)] == [["a", "b"], ["c"], ["d"]]  # c (160 B) alone
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500 mb") == 5 * 10**8
    assert parse_size(1234) == 1234
    for bad in ("", "5XB", "0", -3):
        with pytest.raises(UserError, match="max shard size"):
            parse_size(bad)


def test_moelab_folders_store_tied_weights_once(tmp_path) -> None:
    tiny_hf_model("qwen3").save_pretrained(tmp_path / "hf")  # tied embeddings
    save_moelab(import_hf(tmp_path / "hf"), tmp_path / "ml")
    stored = load_file(tmp_path / "ml" / "model.safetensors")
    assert "embed.weight" in stored and "lm_head.weight" not in stored
