"""Helpers for the analysis tests (and the docs/analysis.md run): tiny labelled data, a short
AdamW loop, and routers whose routing is known (by domain, random, skewed).

Run as a script to train the small models of docs/analysis.md::

    python tests/analysis/cases.py --corpus ../shared/corpus/train.jsonl.gz --out runs/analysis-demo
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.config import DataConfig, ModelConfig, MoEConfig, RunConfig
from moelab.data.loader import Batch, PackedData, Sampler, pack
from moelab.data.synthetic import synthetic_documents
from moelab.data.tokenizer import BytesTokenizer, Tokenizer
from moelab.model.transformer import Transformer
from moelab.moe.decision import RoutingDecision, token_choice_decision

SEQ = 32


def synthetic_data(docs_per_domain: int = 6, seq_len: int = SEQ) -> tuple[PackedData, Tokenizer]:
    tok = BytesTokenizer()
    return pack(synthetic_documents(docs_per_domain, seed=1), tok, seq_len), tok


def small_config(moe: MoEConfig | None, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, moe=moe, **kw
    )


def train(model: nn.Module, data: PackedData, steps: int, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
          on_step=None) -> nn.Module:
    """A plain AdamW loop on loader batches (total loss: LM + weighted router losses)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sampler = Sampler(data.num_blocks, seed=seed)
    model.train()
    for step in range(1, steps + 1):
        b = data.batch(sampler.next_indices(batch_size))
        out = model(b.input_ids, labels=b.labels)
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, model)
    model.eval()
    return model


class ForcedRouter(nn.Module):
    """Wraps a layer's router and replaces its choice by a fixed per-token expert ``[T]``.

    ``expert_fn(batch_shape, token_ids_T) -> [T]`` decides; the wrapped router's scores are kept
    as evidence, but the top-1 score is forced onto the chosen expert so ``top1`` agrees.
    """

    manages_capacity = False

    def __init__(self, inner: nn.Module, expert_fn) -> None:
        super().__init__()
        self.inner = inner
        self.expert_fn = expert_fn

    def forward(self, x_TD: Tensor, batch_shape, token_ids_T=None, token_mask_T=None) -> RoutingDecision:
        d = self.inner(x_TD, batch_shape, token_ids_T=token_ids_T, token_mask_T=token_mask_T)
        expert_T = self.expert_fn(batch_shape, token_ids_T).to(x_TD.device)
        E = d.num_experts
        scores_TE = torch.full((len(expert_T), E), 0.5 / max(1, E - 1), device=x_TD.device)
        scores_TE[torch.arange(len(expert_T)), expert_T] = 0.5
        weight_T1 = torch.ones(len(expert_T), 1, device=x_TD.device)
        return token_choice_decision(expert_T[:, None], weight_T1, scores_TE.log(), scores_TE, batch_shape, token_mask_T)


def force_routing(model: Transformer, expert_fn) -> Transformer:
    """Replace every MoE layer's router by a :class:`ForcedRouter` (top-1; set ``moe.top_k=1``)."""
    for layer in model.moe_layers:
        layer.router = ForcedRouter(layer.router, expert_fn)
    return model


class DomainLookup:
    """``expert_fn`` routing each token by the domain label of the batch being run (set ``current``)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.current: Batch | None = None

    def __call__(self, batch_shape, token_ids_T) -> Tensor:
        assert self.current is not None
        return self.current.label_ids["domain"].reshape(-1) % self.num_experts


class BatchesWithDomain:
    """Iterate batches, telling a :class:`DomainLookup` which batch the model is about to see."""

    def __init__(self, batches, lookup: DomainLookup) -> None:
        self.batches, self.lookup = batches, lookup

    def __iter__(self):
        for b in self.batches:
            self.lookup.current = b
            yield b

    def __len__(self) -> int:
        return len(self.batches)


def random_experts(num_experts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def fn(batch_shape, token_ids_T) -> Tensor:
        return torch.randint(0, num_experts, (batch_shape[0] * batch_shape[1],), generator=g)

    return fn


def main() -> None:  # pragma: no cover - the docs/analysis.md run
    from moelab.analysis.drift import checkpoint_step  # noqa: F401  (checks the package imports)
    from moelab.checkpoint.folder import checkpoint_name
    from moelab.checkpoint.state import save_checkpoint
    from moelab.data.corpus import load_corpus
    from moelab.data.tokenizer import train_bpe

    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dense-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-bytes-per-domain", type=int, default=1_500_000)
    args = p.parse_args()
    torch.manual_seed(0)
    data_cfg = DataConfig(corpus=args.corpus, seq_len=args.seq_len, max_bytes_per_domain=args.max_bytes_per_domain)
    docs = load_corpus(data_cfg)
    tok = train_bpe((d.text for d in docs), args.vocab, max_bytes=2_000_000)
    print(f"{len(docs)} documents, tokenizer trained", flush=True)
    data = pack(docs, tok, args.seq_len)
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=64)
    base = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                       ffn_hidden=128, max_seq_len=args.seq_len, moe=moe)
    for name, cfg in (("moe", base), ("dense", replace(base, moe=None))):
        run = RunConfig(name=name, model=cfg, data=data_cfg)
        model = Transformer(cfg)
        out = Path(args.out) / name

        steps = args.steps if name == "moe" or args.dense_steps is None else args.dense_steps

        def save(step: int, m: nn.Module, out=out, run=run, steps=steps) -> None:
            if step % 10 == 0:
                print(f"{out.name}: step {step}", flush=True)
            if step % args.save_every == 0 or step == steps:
                save_checkpoint(out / "checkpoints" / checkpoint_name(step), m, run, tok, train_state={"step": step})
                print(f"{out.name}: saved step {step}", flush=True)

        save_checkpoint(out / "checkpoints" / checkpoint_name(0), model, run, tok, train_state={"step": 0})
        train(model, data, steps, batch_size=8, on_step=save)


if __name__ == "__main__":  # pragma: no cover
    main()
