"""Checks that a model is of the kind a transformation handles, with an error a user can act on."""

from __future__ import annotations

from torch import nn

from moelab.errors import UserError


def require_decoder_only(model: nn.Module, what: str) -> None:
    """UserError unless ``model`` is a decoder-only :class:`~moelab.model.transformer.Transformer`.

    Upcycling, MoEfication, merging and pruning walk ``model.blocks`` and ``model.cfg.moe`` of
    the decoder-only model; an encoder–decoder (T5, Switch) would fail deep inside instead.
    """
    from moelab.model.transformer import Transformer

    if not isinstance(model, Transformer):
        raise UserError(
            f"{what} works on decoder-only models, not on an encoder–decoder ({type(model).__name__}): "
            "those can be converted and loaded, not transformed yet"
        )
