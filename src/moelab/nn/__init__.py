"""Building blocks below both the MoE layer and the model: activations, the dense FFN, LoRA's low-rank
update, the compute dtype of a matmul. They import nothing of moelab but errors (docs/design.md, layers)."""
