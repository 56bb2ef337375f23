"""moelab: Mixture-of-Experts language models next to their dense twins."""

from moelab.config import ConfigError, ModelConfig, MoEConfig, RouterConfig, preset

__version__ = "0.1.0"

__all__ = ["ConfigError", "MoEConfig", "ModelConfig", "RouterConfig", "__version__", "build_model", "preset"]


def build_model(cfg: ModelConfig):
    """Build a :class:`moelab.model.transformer.Transformer` from a config."""
    from moelab.model.transformer import Transformer

    return Transformer(cfg)
