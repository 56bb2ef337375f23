"""Streamed loading (issue 26): built on meta, each tensor allocated once in its final dtype, read shard by
shard; for every family it equals the plain load (build, read every tensor, load_state_dict) bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from convert.hf_cases import FAMILY_CASES, SEQ2SEQ_CASES, V, tiny_hf_model, tiny_seq2seq
from moelab.convert.families import FAMILIES
from moelab.convert.hf import import_hf, read_hf_folder
from moelab.convert.rules import build_rules, import_tensors
from moelab.errors import UserError
from moelab.model.encoder_decoder import EncoderDecoder
from moelab.model.transformer import Transformer
from moelab.moe.routers.base import Router
from moelab.safetensors_reader import SafetensorsReader

ALL = FAMILY_CASES + SEQ2SEQ_CASES


def _save(kind: str, folder, dtype: torch.dtype, shard: str = "5GB"):
    model = tiny_seq2seq(kind) if kind in SEQ2SEQ_CASES else tiny_hf_model(kind)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)


def eager_reference(path, cfg):
    """The plain load the streaming one replaced: an fp32 model built and initialised normally, every
    tensor of the folder read at once, the mapping run on the dict, ``load_state_dict``."""
    hf, tensors = read_hf_folder(path)
    family = FAMILIES[hf["model_type"]]
    if family.seq2seq:
        from moelab.convert.families.t5 import _EMBED_COPIES, _rules

        model = EncoderDecoder(cfg)
        tied = cfg.decoder.tie_embeddings
        rules = _rules(family.model_type, hf, model)

        def ignore(n: str) -> bool:
            return n in _EMBED_COPIES or (tied and n == "lm_head.weight")
    else:
        model = Transformer(cfg)
        tied = cfg.tie_embeddings
        keys = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
        rules = build_rules(family.tables(hf), cfg, keys)

        def ignore(n: str) -> bool:
            return family.ignore(n, cfg) or (tied and n == "lm_head.weight")

    state = import_tensors(rules, tensors, ignore)
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval()


def cast_like_the_loader(model, dtype: torch.dtype):
    """``model`` in ``dtype`` with routers fp32 and RoPE frequencies as computed in fp32 (the load policy)."""
    freqs = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, Router):
            m.float()
    for n, b in freqs.items():
        owner = model.get_submodule(n.rpartition(".")[0])
        owner.inv_freq = b
    return model


def _logits(model, kind: str):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 9), generator=g)
    with torch.no_grad():
        if kind in SEQ2SEQ_CASES:
            return model(ids, decoder_input_ids=torch.randint(0, V, (2, 5), generator=g)).logits
        return model(ids).logits


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ALL)
def test_streamed_load_equals_the_eager_load_bitwise_in_the_source_dtype(kind, source, tmp_path) -> None:
    _save(kind, tmp_path, source, shard="4KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # read shard by shard
    streamed = import_hf(tmp_path)  # the source's dtype by default
    eager = eager_reference(tmp_path, streamed.cfg)
    ref = eager.state_dict()
    got = streamed.state_dict()
    assert got.keys() == ref.keys()
    for name, t in got.items():
        router = ".router." in name
        assert t.dtype == (torch.float32 if router else source), name
        assert torch.equal(t.float(), ref[name]), name  # the stored values, no rounding anywhere
    assert _tied(streamed) == (streamed.lm_head.weight is streamed.embed.weight)  # a tie is one tensor
    # non-persistent buffers (RoPE inv_freq) were recomputed after leaving meta: same logits, bit for bit
    assert torch.equal(_logits(streamed, kind), _logits(cast_like_the_loader(eager, source), kind))


def _tied(model) -> bool:
    cfg = model.cfg
    return cfg.decoder.tie_embeddings if isinstance(model, EncoderDecoder) else cfg.tie_embeddings


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3", "qwen3", "t5"])
def test_a_requested_dtype_converts_each_tensor_once(kind, tmp_path) -> None:
    _save(kind, tmp_path, torch.bfloat16)
    eager = eager_reference(tmp_path, import_hf(tmp_path, dtype="fp32").cfg)
    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        model = import_hf(tmp_path, dtype=name)
        ref = eager.state_dict()
        for key, t in model.state_dict().items():
            assert t.dtype == (torch.float32 if ".router." in key else dtype), key
            assert torch.equal(t, ref[key].to(t.dtype)), key
        rope = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
        assert rope and all(b.dtype == torch.float32 for b in rope)
    assert _tied(model) == (model.lm_head.weight is model.embed.weight)


def test_bad_dtype_is_one_clear_error(tmp_path) -> None:
    _save("llama", tmp_path, torch.float32)
    with pytest.raises(UserError, match="dtype 'int8' is invalid: use one of fp32, bf16, fp16"):
        import_hf(tmp_path, dtype="int8")


def test_the_reader_drops_its_mapping_every_budget(tmp_path, monkeypatch) -> None:
    """Mapped pages are released every ``map_budget`` bytes and at each file change, not held per shard."""
    import safetensors

    _save("mixtral", tmp_path, torch.bfloat16, shard="20KB")
    opened: list[str] = []
    real = safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    files = sorted((tmp_path).glob("*.safetensors"))
    assert len(files) > 2
    eager = read_hf_folder(tmp_path)[1]
    opened.clear()
    with SafetensorsReader.folder(tmp_path) as reader:  # 64 MiB budget: each (tiny) file opened once
        assert all(torch.equal(reader[n], eager[n]) for n in reader.in_file_order())
    assert sorted(opened) == [str(f) for f in files]
    opened.clear()
    with SafetensorsReader.folder(tmp_path, map_budget=1) as reader:  # re-opened before every tensor
        assert all(torch.equal(reader[n], eager[n]) for n in reader.in_file_order())
        assert len(opened) == len(reader)
    assert reader._handle is None  # closed on exit


def test_reader_refuses_what_is_not_safetensors(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04pickle-ish bytes that are not a header")
    with pytest.raises(UserError, match="is not a safetensors file"):
        SafetensorsReader.folder(tmp_path)


@pytest.mark.parametrize("bad", ["model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.norm.weight"])
def test_a_tensor_of_the_wrong_shape_is_one_error_naming_it(bad, tmp_path) -> None:
    """Sources are written into slices of preallocated parameters: a wrong shape must not broadcast."""
    from safetensors.torch import load_file, save_file

    _save("mixtral", tmp_path, torch.float32)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors[bad] = tensors[bad][:1]  # one row: copy_ would broadcast it over the slice
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"'{bad.replace('.', '[.]')}' gives \[1[,\]]") as err:
        import_hf(tmp_path)
    assert "\n" not in str(err.value)
