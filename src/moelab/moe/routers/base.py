"""The router interface and registry.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import ConfigError
from moelab.moe.decision import RoutingDecision, token_choice_decision
from moelab.moe.routers.options import RouterOptions, parse_options
from moelab.registry import Registry

if TYPE_CHECKING:
    from moelab.config import MoEConfig


@dataclass(frozen=True)
class DecodeSpec:
    """What a router's decision for one token is, in terms a decode step can compute without the router's
    forward: a softmax top-``top_k`` over the fp32 logits ``x·W_gᵀ``, combine weights by ``weights``
    (``renormalize``: kept probabilities over their sum; ``probs``: kept probabilities as they are;
    ``softmax_after_topk``: a softmax over the kept logits). See :func:`softmax_topk_weights`."""

    top_k: int
    weights: str


def softmax_topk_weights(kept_logits_TK: Tensor, expert_TK: Tensor, scores_TE: Tensor, mode: str) -> Tensor:
    """``[T, K]`` combine weights of a softmax top-k decision (``mode``: :class:`DecodeSpec`'s ``weights``): the router's
    forward and every decode step compute them here, so the two can never differ."""
    if mode == "softmax_after_topk":
        return kept_logits_TK.softmax(dim=-1)
    weight_TK = scores_TE.gather(1, expert_TK)
    if mode == "renormalize":
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    return weight_TK


@dataclass(frozen=True)
class Selection:
    """A token-choice router's own output: ``expert_TK`` ``[T, K]`` chosen experts, ``weight_TK`` their
    combine weights, ``logits_TE``/``scores_TE`` ``[T, E]`` fp32 (what the balance losses read)."""

    expert_TK: Tensor
    weight_TK: Tensor
    logits_TE: Tensor
    scores_TE: Tensor


class Router(nn.Module):
    """Base class: ``forward(x_TD, ...) -> RoutingDecision``.

    Class attributes describe the family for docs and config checks:
    ``needs_token_ids`` (hash routing), ``causal_safe`` (decision for token t uses no later
    token), ``learned`` (has trainable parameters; only learned routers own a ``gate``),
    ``manages_capacity`` (the router bounds each expert's load itself, so the layer's capacity
    policy is not applied on top), ``smooth_load`` (the decision carries the noise evidence the
    smooth ``load`` loss needs), ``balancing`` (one line for docs: how the router is balanced).

    Token ids: every router receives ``token_ids_T`` (the model's ``input_ids`` flattened) and
    ``token_mask_T`` (False = padding); routers that do not need ids ignore them, routers with
    ``needs_token_ids`` raise ConfigError when they are missing.
    """

    needs_token_ids: ClassVar[bool] = False
    causal_safe: ClassVar[bool] = True
    learned: ClassVar[bool] = True
    manages_capacity: ClassVar[bool] = False
    smooth_load: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    balancing: ClassVar[str] = "aux loss (moe.aux_loss)"
    # for the docs table (moelab routers --markdown): what the options, causality and learnedness columns add
    options_note: ClassVar[str] = ""
    causal_note: ClassVar[str] = ""
    learned_note: ClassVar[str] = ""

    Options: ClassVar[type[RouterOptions]] = RouterOptions  # this router's own options (moe.router.*)

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.options = self.options_of(cfg)
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        if self.learned:
            self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)

    @classmethod
    def options_of(cls, cfg: MoEConfig) -> Any:
        """``cfg.router``'s options as this router's :attr:`Options` (defaults filled, checked)."""
        return parse_options(cls.Options, cfg.router)

    @classmethod
    def validate(cls, cfg: MoEConfig) -> None:
        """Raise ConfigError for MoE settings this router cannot honour with its options (read them with
        :meth:`options_of`). Default: nothing to check."""

    def jitter(self, x_TD: Tensor) -> Tensor:
        """Switch-style multiplicative input noise ``x · U(1-eps, 1+eps)``, in training only (routers whose
        options have ``jitter_eps``)."""
        eps = getattr(self.options, "jitter_eps", 0.0)
        if self.training and eps > 0:
            return x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def logits(self, x_TD: Tensor) -> Tensor:
        """``[T, E]`` fp32 router logits (router math stays fp32 under autocast)."""
        if torch.is_autocast_enabled(x_TD.device.type):  # entering the context costs µs per decode step
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                return F.linear(x_TD.float(), self.gate.weight.float())
        return F.linear(x_TD.float(), self.gate.weight.float())

    def top_k_experts(self, choice_TE: Tensor) -> Tensor:
        """``[T, K]`` the K best experts of each token by ``choice_TE``, or the round-robin assignment under
        ``force_balanced`` (every router honours it: throughput benchmarks set it for all)."""
        if self.options.force_balanced:
            return round_robin_experts(choice_TE.shape[0], self.num_experts, self.top_k, choice_TE.device)
        return choice_TE.topk(self.top_k, dim=-1).indices

    def decode_spec(self) -> DecodeSpec | None:
        """This router's decision for a lone token as a :class:`DecodeSpec`, for decode steps that route
        without the router's forward (batch-1 fast decoding, the native fused MoE step); None when it is not
        such a decision (then decoding calls the router's forward: slower, never different). Default: None."""
        return None

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Selection:
        """This router's own math for token-choice routing: each token's experts and combine weights, and
        the fp32 logits and scores they came from. Implemented by every token-choice router."""
        raise NotImplementedError(f"{type(self).__name__} implements neither select() nor forward()")

    def decide(self, s: Selection, batch_shape: tuple[int, int], token_mask_T: Tensor | None) -> RoutingDecision:
        """The :class:`RoutingDecision` of a selection (a router that reports more evidence overrides it)."""
        return token_choice_decision(s.expert_TK, s.weight_TK, s.logits_TE, s.scores_TE, batch_shape, token_mask_T)

    def forward(
        self,
        x_TD: Tensor,
        batch_shape: tuple[int, int],
        token_ids_T: Tensor | None = None,
        token_mask_T: Tensor | None = None,
    ) -> RoutingDecision:
        """The shared work: token ids checked for routers that need them, then :meth:`select` (the router's
        own math) and :meth:`decide`. A router that is not token-choice (expert choice) overrides this."""
        if self.needs_token_ids and token_ids_T is None:
            raise ConfigError(
                f"moe.router.name={self.cfg.router.name!r} is invalid here: this router needs token ids, but this "
                "MoE layer was called without them; call the model with input_ids (or MoELayer with token_ids_BS), "
                "or choose another router"
            )
        return self.decide(self.select(x_TD, token_ids_T), batch_shape, token_mask_T)


ROUTERS: Registry[type[Router]] = Registry("router")


def build_router(d_model: int, cfg: MoEConfig) -> Router:
    return ROUTERS[cfg.router.name](d_model, cfg)


def round_robin_experts(num_tokens: int, num_experts: int, top_k: int, device: torch.device) -> Tensor:
    """``[T, K]`` perfectly balanced assignment: token t takes experts (t·K + j) mod E.

    The K experts of a token are distinct because K <= E. Used by ``force_balanced``.
    """
    idx = torch.arange(num_tokens * top_k, device=device).view(num_tokens, top_k)
    return idx % num_experts
