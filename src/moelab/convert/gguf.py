"""Write a moelab model as a GGUF file that llama.cpp runs: the same weights in another engine.

Why: moelab's decode speed is only a claim until it is measured next to a mature engine on the same
weights (``moelab bench-decode --peer llama.cpp``). llama.cpp reads GGUF; its ``llama`` architecture
covers the models moelab exports as Llama (dense) and Mixtral (softmax top-k MoE, every layer MoE).

What is written (names and layouts are llama.cpp's, shapes in ggml order, innermost first):
- ``token_embd`` (the embedding, never quantized: moelab's int8/int4 keep it in floating point too),
  per block ``attn_norm``, ``attn_q/k/v/output``, ``ffn_norm``, then ``ffn_gate/up/down`` (dense) or
  ``ffn_gate_inp`` (the router, fp32) and ``ffn_gate_exps/up_exps/down_exps`` ``[E, F, D]`` stacks;
  ``output_norm`` and ``output`` (absent when the head is tied: llama.cpp then reuses ``token_embd``).
- Queries and keys are reordered head by head: moelab (like Hugging Face) rotates the two halves of
  a head (``x[:h/2]``, ``x[h/2:]``), llama.cpp's ``llama`` rotates adjacent pairs, so row ``j`` of a
  half goes to row ``2j`` (first half) or ``2j + 1`` (second half). q·k is unchanged.
- ``weights``: ``f32``, ``f16``, ``bf16`` for every matrix, or ``q8_0`` / ``q4_0`` for the matrices
  moelab's ``--dtype int8/int4`` quantizes (attention, FFN or experts, the untied head); norms and routers stay f32.
- A placeholder SentencePiece vocabulary (``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens where the
  vocabulary has room, then ``t{i}``): enough for llama.cpp to load the file and run on token ids.

Needs the ``gguf`` package (``pip install -e ".[peer]"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab.errors import UserError
from moelab.outputs import discard, fsync_file, temporary_sibling

WEIGHTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
INSTALL = 'pip install -e ".[peer]"'


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError(f"writing GGUF needs the gguf package: {INSTALL}") from None
    return gguf


def check_gguf_model(model: torch.nn.Module) -> None:
    """Refuse, in one line, a model llama.cpp's ``llama`` architecture would not run as moelab does."""
    from moelab.convert.families import FAMILIES, default_family

    cfg = model.cfg
    family = default_family(cfg)
    if family not in ("llama", "mixtral") or cfg.attention != "causal":
        raise UserError(
            f"GGUF export covers Llama-style dense and Mixtral-style MoE decoders; this model exports as {family!r} "
            f"(attention={cfg.attention!r}): compare it with transformers instead (bench-decode without --peer)"
        )
    FAMILIES[family].config_out(cfg)  # the family's checks: biases, norms, router kind, MoE in every layer


def rotate_pairs_layout(w_RD: Tensor, heads: int) -> Tensor:
    """q or k projection rows ``[heads·h, D]`` in the rotate-halves order → the adjacent-pairs order
    llama.cpp's ``llama`` architecture rotates: within each head, half-row ``j`` of the first half goes
    to row ``2j``, of the second half to ``2j + 1``."""
    rows, d = w_RD.shape
    h = rows // heads
    return w_RD.reshape(heads, 2, h // 2, d).transpose(1, 2).reshape(rows, d)


def gguf_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    """``(llama.cpp name, fp32 tensor in numpy order, quantizable)`` for every weight of ``model``."""
    cfg = model.cfg
    yield "token_embd.weight", model.embed.weight, False
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        attn = block.attn
        yield p + "attn_norm.weight", block.attn_norm.weight, False
        yield p + "attn_q.weight", rotate_pairs_layout(attn.q_proj.weight, cfg.n_heads), True
        yield p + "attn_k.weight", rotate_pairs_layout(attn.k_proj.weight, cfg.n_kv_heads), True
        yield p + "attn_v.weight", attn.v_proj.weight, True
        yield p + "attn_output.weight", attn.o_proj.weight, True
        yield p + "ffn_norm.weight", block.ffn_norm.weight, False
        if block.is_moe:
            ffn = block.ffn
            gate, up = ffn.experts.w_up.chunk(2, dim=1)  # [E, F, D] each: gate rows first
            yield p + "ffn_gate_inp.weight", ffn.router.gate.weight, False
            yield p + "ffn_gate_exps.weight", gate, True
            yield p + "ffn_up_exps.weight", up, True
            yield p + "ffn_down_exps.weight", ffn.experts.w_down, True
        else:
            gate, up = block.ffn.w_up.weight.chunk(2, dim=0)
            yield p + "ffn_gate.weight", gate, True
            yield p + "ffn_up.weight", up, True
            yield p + "ffn_down.weight", block.ffn.w_down.weight, True
    yield "output_norm.weight", model.norm.weight, False
    if not cfg.tie_embeddings:
        yield "output.weight", model.lm_head.weight, True


def placeholder_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a SentencePiece-style vocabulary of ``size`` entries."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # unknown, control, control
    if size >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256  # byte
    tokens += [f"t{i}" for i in range(len(tokens), size)]
    types += [1] * (size - len(types))
    return tokens[:size], [0.0] * size, types[:size]


def export_gguf(model: torch.nn.Module, path: str | Path, weights: str = "bf16") -> Path:
    """Write ``model`` to ``path`` (a new file; written beside it and renamed, so a failed run leaves
    nothing behind). ``weights``: one of :data:`WEIGHTS`."""
    gguf = _gguf()
    if weights not in WEIGHTS:
        raise UserError(f"unknown GGUF weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists: moelab writes a GGUF file only where there is none")
    check_gguf_model(model)
    cfg = model.cfg
    if weights in ("q8_0", "q4_0"):
        odd = [(n, t.shape[-1]) for n, t, q in gguf_tensors(model) if q and t.shape[-1] % 32]
        if odd:
            raise UserError(
                f"{weights} stores blocks of 32 inputs; {odd[0][0]} has {odd[0][1]} (every quantized matrix's input "
                "size must be a multiple of 32): use bf16 or f16 for this model"
            )
    Q = gguf.GGMLQuantizationType
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[weights]
    float_type = matrix_type if weights in ("f32", "f16", "bf16") else Q.BF16
    tmp = temporary_sibling(path, "gguf")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_header(gguf, writer, cfg, weights)
        for name, t, quantizable in gguf_tensors(model):
            data = t.detach().float().cpu().numpy()
            kind = (matrix_type if quantizable else float_type) if data.ndim > 1 and "gate_inp" not in name else Q.F32
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(tmp)
        tmp.replace(path)
    except BaseException:
        writer.close()
        discard(tmp)
        raise
    return path


def _write_header(gguf: Any, writer: Any, cfg: Any, weights: str) -> None:
    moe = cfg.moe
    writer.add_name(f"moelab {'moe' if moe else 'dense'} {cfg.d_model}d{cfg.n_layers}L")
    F = gguf.LlamaFileType
    writer.add_file_type(
        {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[weights]
    )
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(moe.expert_hidden if moe else cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if moe is not None:
        writer.add_expert_count(moe.num_experts)
        writer.add_expert_used_count(moe.top_k)
    tokens, scores, types = placeholder_vocab(cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def read_gguf_tensor(path: str | Path, name: str) -> np.ndarray:
    """One tensor of a GGUF file as fp32 in numpy order (dequantized): for tests and checks."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name == name:
            return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    raise KeyError(name)


__all__ = ["WEIGHTS", "check_gguf_model", "export_gguf", "gguf_tensors", "read_gguf_tensor", "rotate_pairs_layout"]
