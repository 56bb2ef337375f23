"""Quality of weight-only quantization: validation bits per byte, fp32 vs int8 vs int4.

Two steps (the first is slow, the second re-uses its checkpoint):

    python benchmarks/quant_quality.py train --out /tmp/quantq/ckpt [--steps 400]
    python benchmarks/quant_quality.py eval --ckpt /tmp/quantq/ckpt [--json out.json]

``train`` fits a small MoE (bytes tokenizer, d 128, 4 layers, 8 experts top-2, expert hidden 128)
on ../shared/corpus with a plain AdamW loop on ``moelab.data.loader`` batches and saves it with
``save_checkpoint``. ``eval`` quantizes that checkpoint every way (int8; int4 group 32/64/128;
experts only and all linears), and prints validation bits per byte as a markdown table. The
bulk of the scoring uses ``dequantize_model`` (fp32 F.linear on the same ŵ), because the
weight-only kernels are built for decode-sized batches and crawl on 4096-row ones; the first
batch is also scored with the real kernels and the gap printed.

Bits per byte: with the bytes tokenizer one token is one UTF-8 byte, so bpb = Σ CE (nats) / ln 2
/ the number of byte-valued targets (end-of-document targets add their loss but no byte).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from moelab.checkpoint.state import save_checkpoint
from moelab.config import IGNORE_INDEX, DataConfig, ModelConfig, MoEConfig, RunConfig
from moelab.convert.load import load_model
from moelab.data.corpus import load_files
from moelab.data.loader import Sampler, eval_batches, pack
from moelab.data.tokenizer import BytesTokenizer
from moelab.model.transformer import Transformer

CORPUS = next(
    (p / "shared" / "corpus" for p in Path(__file__).resolve().parents if (p / "shared" / "corpus").is_dir()),
    Path("../shared/corpus"),
)
SEQ_LEN = 256


def model_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=259, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512, max_seq_len=SEQ_LEN,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=128),
    )


def data(corpus: Path, max_val_docs: int | None = None):
    """Train split from train.jsonl.gz, validation from valid.jsonl.gz, bytes-tokenised."""
    tok = BytesTokenizer()
    train_docs = load_files(corpus / "train.jsonl.gz")[::4]  # every 4th document: ~11 MB, all domains
    val_docs = load_files(corpus / "valid.jsonl.gz")
    train = pack(train_docs, tok, SEQ_LEN)
    val = pack(val_docs[:max_val_docs] if max_val_docs else val_docs, tok, SEQ_LEN, train.label_names)
    return tok, train, val


@torch.no_grad()
def bits_per_byte(model: Transformer, batches) -> float:
    nats, nbytes = 0.0, 0
    for b in batches:
        logits = model(b.input_ids).logits.float()
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), b.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        nats += float(ce)
        nbytes += int(((b.labels >= 0) & (b.labels < 256)).sum())
    return nats / math.log(2) / nbytes


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    tok, train_data, val_data = data(Path(args.corpus))
    cfg = model_config()
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sampler = Sampler(train_data.num_blocks, seed=0)
    val = eval_batches(val_data, 16, max_batches=8)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        b = train_data.batch(sampler.next_indices(args.batch))
        out = model(b.input_ids, labels=b.labels)
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps:
            model.eval()
            print(f"step {step} loss {out.loss.item():.3f} val_bpb {bits_per_byte(model, val):.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
            model.train()
    run = RunConfig(model=cfg, data=DataConfig(corpus=str(args.corpus), tokenizer="bytes", seq_len=SEQ_LEN))
    save_checkpoint(args.out, model.eval(), run, tok, train_state={"step": args.steps})
    print("saved", args.out)


def evaluate(args: argparse.Namespace) -> None:
    from moelab.quant import dequantize_model, quantize_model

    model, _ = load_model(args.ckpt)
    val_data = pack(load_files(Path(args.corpus) / "valid.jsonl.gz"), BytesTokenizer(), SEQ_LEN)
    val = eval_batches(val_data, 16, max_batches=args.val_batches)
    rows = [("fp32", "-", "-", bits_per_byte(model, val), 0.0)]
    for only in ("experts", "all"):
        for bits, group in ((8, None), (4, 32), (4, 64), (4, 128)):
            q = quantize_model(copy.deepcopy(model), bits=bits, group_size=group or 32, only=only)
            # the kernels are slow on 4096-row batches: score the dequantized twin (same ŵ), and
            # check it against the real kernels on the first batch
            with torch.no_grad():
                kernel_bpb = bits_per_byte(q, val[:1])
                dq = dequantize_model(q)
                gap = abs(bits_per_byte(dq, val[:1]) - kernel_bpb)
            rows.append((f"int{bits}", str(group or "per-channel"), only, bits_per_byte(dq, val), gap))
            print(rows[-1], flush=True)
    base = rows[0][3]
    lines = [
        "| weights | group | quantized | val bits/byte | change vs fp32 | kernel vs dequantized, 1 batch |",
        "|---|---|---|---|---|---|",
    ]
    for name, group, only, bpb, gap in rows:
        lines.append(f"| {name} | {group} | {only} | {bpb:.4f} | {100 * (bpb / base - 1):+.2f}% | {gap:.1e} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("weights", "group", "only", "bpb", "kernel_gap"), r)) for r in rows], indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--corpus", default=str(CORPUS))
    e = sub.add_parser("eval")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--val-batches", type=int, default=24, help="16 blocks of 256 bytes each, spread over the split")
    e.add_argument("--json")
    e.add_argument("--corpus", default=str(CORPUS))
    args = p.parse_args()
    torch.set_num_threads(1)
    train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    main()
