"""Inference: KV caches, generation, offloaded experts, serving."""
