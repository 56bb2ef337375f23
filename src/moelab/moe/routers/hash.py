"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

No learned router: the expert of a token is a fixed, seeded hash of its token id, so identical
ids always go to the same expert and an expert's load follows the frequency of the ids that
hash to it. With K > 1 a token takes K consecutive experts ``(h, h+1, …, h+K-1) mod E`` with
weight 1/K each.

The hash is two rounds of a seeded affine map modulo the Mersenne prime 2³¹−1 with an
xor-shift between them (integer arithmetic that stays inside int64 on every device), then mod E;
``moe.router.hash_seed`` picks the function.

The router needs token ids: the Transformer passes ``input_ids`` to every MoE layer, and a call
without them raises ConfigError naming ``moe.router.name``. There is nothing to balance by loss
(set ``moe.aux_loss=none``): ``decision.logits`` are zeros and ``decision.scores`` the fixed
assignment (1/K on the chosen experts).

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.moe.routers.base import ROUTERS, Router, Selection
from moelab.moe.routers.options import RouterOptions

MERSENNE_31 = 2_147_483_647


def hash_token_ids(token_ids_T: Tensor, seed: int) -> Tensor:
    """``[T]`` int64 in ``[0, 2³¹−1)``: a seeded hash of (non-negative) token ids."""
    p = MERSENNE_31
    a1 = 1 + (seed * 48271 + 2_654_435) % (p - 1)
    b1 = (seed * 16807 + 97_531) % p
    a2 = 1 + (seed * 69621 + 40_503) % (p - 1)
    b2 = (seed * 39373 + 12_345) % p
    h = (token_ids_T.long() % p * a1 + b1) % p
    h = h ^ (h >> 15)
    return (h * a2 + b2) % p


@dataclass(frozen=True)
class HashOptions(RouterOptions):
    hash_seed: int = 0  # which hash function maps token ids to experts


@ROUTERS.register("hash")
class HashRouter(Router):
    """Expert fixed by a seeded hash of the token id; no learned parameters (Roller et al. 2021)."""

    paper = "Roller et al. 2021 (hash layers)"
    Options = HashOptions
    formula = "`e = hash_seed(token_id) mod E` (K > 1: experts e, e+1, …, e+K−1); `w = 1/K`"
    balancing = "none: load follows token frequency (set `moe.aux_loss=none`)"
    options_note = "needs token ids"
    learned_note = "no router parameters"
    needs_token_ids = True
    learned = False

    def select(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Selection:
        assert token_ids_T is not None  # Router.forward refuses a call without them (needs_token_ids)
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        first_T = hash_token_ids(token_ids_T.reshape(-1).to(x_TD.device), self.options.hash_seed) % E
        expert_TK = (first_T.unsqueeze(-1) + torch.arange(K, device=x_TD.device)) % E
        weight_TK = torch.full((T, K), 1.0 / K, device=x_TD.device)
        logits_TE = torch.zeros(T, E, device=x_TD.device)
        scores_TE = torch.zeros(T, E, device=x_TD.device).scatter_(1, expert_TK, 1.0 / K)
        return Selection(expert_TK, weight_TK, logits_TE, scores_TE)
