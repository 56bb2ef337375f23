"""Mapping tables, one per Hugging Face family: moelab name → HF name (or how to build it).

Keys are moelab parameter names (relative to ``blocks.{i}.`` in the per-layer tables; a tuple
key is several moelab tensors stored as one HF tensor). Values are HF names relative to the
layer prefix, or a :mod:`~moelab.convert.rules` spec. Entries whose moelab tensors the model
does not have (biases, q/k norms, shared experts…) are skipped, so one table serves every
option of a family. Checked against transformers 5.23's modules and its saved checkpoints.
"""

from __future__ import annotations

from typing import Any

from moelab.config import ModelConfig
from moelab.convert.rules import Alt, Cat, ExpertStack, RopeRows, Same, Split, Tables, Transposed

# --------------------------------------------------------------------------- shared pieces

_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

_ATTN = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}


def _swiglu(prefix: str) -> dict[str, Any]:
    """A gate/up/down SwiGLU FFN at ``prefix`` (dense layer or shared expert)."""
    return {
        "w_up.weight": Cat((f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight")),
        "w_down.weight": f"{prefix}.down_proj.weight",
        "w_up.bias": Cat((f"{prefix}.gate_proj.bias", f"{prefix}.up_proj.bias")),
        "w_down.bias": f"{prefix}.down_proj.bias",
    }


def _prefixed(p: str, table: dict[str, Any]) -> dict[str, Any]:
    return {p + k: v for k, v in table.items()}


def _moe(block: str, gate: str, up: str, down: str, fused_block: str = "mlp") -> dict[str, Any]:
    """Router and routed experts of a sparse block at ``block`` (per-expert names use ``{e}``).

    transformers 5 holds experts fused (``{fused_block}.experts.gate_up_proj``/``down_proj``);
    checkpoints saved from memory in that layout are read too.
    """
    router = f"{block}.gate.weight"
    return {
        "ffn.router.gate.weight": router
        if block == fused_block
        else Alt((router, f"{fused_block}.gate.weight")),
        "ffn.experts.w_up": ExpertStack(
            (f"{block}.experts.{{e}}.{gate}.weight", f"{block}.experts.{{e}}.{up}.weight"),
            fused=f"{fused_block}.experts.gate_up_proj",
        ),
        "ffn.experts.w_down": ExpertStack(
            (f"{block}.experts.{{e}}.{down}.weight",), fused=f"{fused_block}.experts.down_proj"
        ),
    }


_LLAMA_LAYER = {**_ATTN, **_prefixed("ffn.", _swiglu("mlp"))}
_QWEN_MOE_LAYER = {
    **_LLAMA_LAYER,
    **_moe("mlp", "gate_proj", "up_proj", "down_proj"),
    **_prefixed("ffn.shared.", _swiglu("mlp.shared_expert")),
    "ffn.shared.gate.weight": "mlp.shared_expert_gate.weight",
}

LLAMA = Tables(_TOP, _LLAMA_LAYER, "model.layers.{i}.")
MIXTRAL = Tables(_TOP, {**_ATTN, **_moe("block_sparse_moe", "w1", "w3", "w2")}, "model.layers.{i}.")
QWEN_MOE = Tables(_TOP, _QWEN_MOE_LAYER, "model.layers.{i}.")  # Qwen2-MoE, Qwen3-MoE, OLMoE
GPT2 = Tables(
    {
        "embed.weight": "transformer.wte.weight",
        "pos_embed.weight": "transformer.wpe.weight",
        "norm.weight": "transformer.ln_f.weight",
        "norm.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight",
    },
    {
        "attn_norm.weight": "ln_1.weight",
        "attn_norm.bias": "ln_1.bias",
        "ffn_norm.weight": "ln_2.weight",
        "ffn_norm.bias": "ln_2.bias",
        ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"): Split(
            "attn.c_attn.weight", transpose=True
        ),
        ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"): Split("attn.c_attn.bias"),
        "attn.o_proj.weight": Transposed("attn.c_proj.weight"),
        "attn.o_proj.bias": "attn.c_proj.bias",
        "ffn.w_up.weight": Transposed("mlp.c_fc.weight"),
        "ffn.w_up.bias": "mlp.c_fc.bias",
        "ffn.w_down.weight": Transposed("mlp.c_proj.weight"),
        "ffn.w_down.bias": "mlp.c_proj.bias",
    },
    "transformer.h.{i}.",
    ignore=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers some GPT-2 checkpoints carry
)


def deepseek_v3(interleaved: bool) -> Tables:
    """DeepSeek-V3: MLA attention, sigmoid router with correction bias, shared experts, first-k dense.

    With ``rope_interleave`` the RoPE rows of the query and of the shared RoPE key are stored as
    interleaved pairs; they are permuted to moelab's rotate-half order on import and back on export.
    """

    def rows(name: str, head_rows, heads, rope):
        return RopeRows(name, head_rows, heads, rope) if interleaved else Same(name)

    def qk(c: ModelConfig) -> int:
        return c.mla.qk_head_dim  # type: ignore[union-attr]

    def dr(c: ModelConfig) -> int:
        return c.mla.qk_rope_head_dim  # type: ignore[union-attr]

    def kv_rows(c: ModelConfig) -> int:
        return c.mla.kv_lora_rank + c.mla.qk_rope_head_dim  # type: ignore[union-attr]

    def heads(c: ModelConfig) -> int:
        return c.n_heads

    def one(c: ModelConfig) -> int:
        return 1

    layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn.q_proj.weight": rows("self_attn.q_proj.weight", qk, heads, dr),
        "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
        "attn.q_a_proj.bias": "self_attn.q_a_proj.bias",
        "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
        "attn.q_b_proj.weight": rows("self_attn.q_b_proj.weight", qk, heads, dr),
        "attn.kv_a_proj.weight": rows("self_attn.kv_a_proj_with_mqa.weight", kv_rows, one, dr),
        "attn.kv_a_proj.bias": rows("self_attn.kv_a_proj_with_mqa.bias", kv_rows, one, dr),
        "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        "attn.o_proj.bias": "self_attn.o_proj.bias",
        **_prefixed("ffn.", _swiglu("mlp")),
        **_moe("mlp", "gate_proj", "up_proj", "down_proj"),
        "ffn.router.bias": "mlp.gate.e_score_correction_bias",
        **_prefixed("ffn.shared.", _swiglu("mlp.shared_experts")),
    }
    return Tables(_TOP, layer, "model.layers.{i}.")
