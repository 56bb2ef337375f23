"""Benchmark: expert offloading on a small MoE trained on ../shared/corpus (not a test).

Trains a byte-level MoE (16 experts, top-2) for a few hundred steps on the shared corpus, then
decodes held-out prompts at batch 1 with the experts offloaded to a memory-mapped safetensors
file behind per-layer caches of 12.5 / 25 / 50 % of the experts, for LRU, LFU (seeded from a
calibration trace), LFU + prefetch and LRU + prefetch. Writes JSON and a markdown table.

    python benchmarks/offload.py --steps 300 --out benchmarks/results/offload.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.infer.generate import SamplingParams, generate
from moelab.infer.offload import Offloader, export_experts, routing_counts
from moelab.model.transformer import Transformer

CORPUS = next((p / "shared" / "corpus" for p in Path(__file__).resolve().parents if (p / "shared" / "corpus").is_dir()),
              Path("../shared/corpus"))
EOS = 257


def load_docs(name: str, limit_bytes: int, seed: int) -> list[bytes]:
    with gzip.open(CORPUS / name, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"].encode("utf-8") for line in f]
    random.Random(seed).shuffle(docs)
    out, total = [], 0
    for d in docs:
        out.append(d)
        total += len(d)
        if total >= limit_bytes:
            break
    return out


def train(cfg: ModelConfig, docs: list[bytes], steps: int, batch: int, seq: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    stream = torch.tensor([t for d in docs for t in (*d, EOS)], dtype=torch.long)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        x = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        out = model(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


def run(model_state, cfg, prompts, params, expert_file, capacity=None, policy="lru", prefetch=False, counts=None):
    model = Transformer(cfg).eval()
    model.load_state_dict(model_state)
    off = None
    if capacity is not None:
        off = Offloader(model, capacity, policy, prefetch=prefetch, source=expert_file, counts=counts)
    tokens, t0 = 0, time.perf_counter()
    outputs = []
    for p in prompts:  # batch 1: the bandwidth-bound decode case
        (c,) = generate(model, [p], params)
        tokens += len(c.token_ids)
        outputs.append(c.token_ids)
    dt = time.perf_counter() - t0
    row = {"policy": policy + ("+prefetch" if prefetch else ""), "cache": capacity or "all in memory",
           "tokens_per_s": tokens / dt, "tokens": tokens}
    if off is not None:
        row.update(off.stats.as_dict())
    return row, outputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/offload.json")
    ap.add_argument("--repeats", type=int, default=3, help="tokens/s is the best of this many runs")
    ap.add_argument("--model-cache", default="runs/bench_offload/model.safetensors",
                    help="trained weights are saved here and reused (delete to retrain)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=259, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512,
                      max_seq_len=256, moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=128))
    cached = Path(args.model_cache)
    if cached.is_file():  # the same training run, kept between benchmark runs
        from safetensors.torch import load_model

        model = Transformer(cfg).eval()
        load_model(model, str(cached))
    else:
        model = train(cfg, load_docs("train.jsonl.gz", 4_000_000, args.seed), args.steps, args.batch, args.seq, args.seed)
        from safetensors.torch import save_model

        cached.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, str(cached))
    state = model.state_dict()
    valid = load_docs("valid.jsonl.gz", 10**9, args.seed + 1)
    prompts = [list(d[:64]) for d in valid if len(d) >= 64][: args.prompts]
    calib_docs = load_docs("train.jsonl.gz", 200_000, args.seed + 2)
    calib = torch.tensor([t for d in calib_docs for t in (*d, EOS)][: 32 * 256]).view(32, 256)
    counts = routing_counts(model, calib.split(4))
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        expert_file = export_experts(model, Path(tmp) / "experts.safetensors")
        def best(*a):
            runs = [run(state, cfg, prompts, params, expert_file, *a) for _ in range(args.repeats)]
            row, outputs = runs[0]
            row["tokens_per_s"] = max(r["tokens_per_s"] for r, _ in runs)
            assert all(r.get("hits") == row.get("hits") for r, _ in runs)  # caches start empty every run
            return row, outputs

        base, reference = best()
        rows.append(base)
        for capacity in ("12.5%", "25%", "50%"):
            for policy, prefetch in (("lru", False), ("lru", True), ("lfu", False), ("lfu", True), ("pinned", False)):
                row, outputs = best(capacity, policy, prefetch, counts)
                row["identical_to_in_memory"] = outputs == reference
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": "d128 L4 E16 k2 F128 byte vocab", "steps": args.steps, "prompts": len(prompts),
            "new_tokens": args.new_tokens, "device": "cpu (1 thread, shared 2-core machine)", "repeats": args.repeats, "expert tier": "memory-mapped safetensors"}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| cache | policy | decode tok/s | hit rate | demand MB | prefetch MB | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['policy']} | {r['tokens_per_s']:.0f} | "
              f"{r.get('hit_rate', 1.0):.1%} | {r.get('bytes_moved', 0) / 1e6:.2f} | "
              f"{r.get('prefetch_bytes', 0) / 1e6:.2f} | {r.get('identical_to_in_memory', True)} |")


if __name__ == "__main__":
    main()
