"""Benchmark: a released-size MoE on this machine (not a test).

An OLMoE-1B-7B-shaped model (64 experts, top-8, 16 layers, d 2048: 6.9B parameters, 1.3B active),
random weights written once as sharded bf16 safetensors by transformers' own ``OlmoeForCausalLM``
(with moelab's bytes tokenizer beside it, so every moelab command takes the folder), then, each stage
in a fresh process so that its peak RSS (``VmHWM``) is its own:

1. ``load``: moelab's streamed load in bf16 — seconds, peak RSS against the weights' bytes;
2. ``analyze``: ``moelab analyze`` on ``../shared/corpus`` (routing load, baseline-corrected
   specialisation, drops) — tokens/s and peak RSS;
3. ``decode-bf16``: batch-1 greedy decode after a 64-token prompt — tok/s next to ``moelab calc``'s
   bandwidth-bound prediction at the memory bandwidth measured in the same process;
4. ``quantize``: ``moelab quantize --bits 4 --group 32 --only experts`` streamed — seconds, peak RSS;
5. ``decode-int4``: the same decode on the int4 checkpoint, next to calc's int4 prediction;
6. ``lora``: ``moelab train --init`` the bf16 folder with LoRA adapters on attention and experts
   (the base stays bf16, ``train.lora.base_dtype=auto``) on ``../shared/corpus`` — peak RSS next to the
   weights and the memory check's lower bound, tokens/s and the matmul rate they imply.

    python benchmarks/real_size.py --work /tmp/real-size --out benchmarks/results/real-size [--overwrite]

Writes ``OUT.json`` and ``OUT.md``. Needs ≈14 GB of RAM for the write stage (transformers builds the
whole model once) and ≈20 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = next((p / "shared" / "corpus" for p in ROOT.parents if (p / "shared" / "corpus").is_dir()),
              Path("../shared/corpus"))  # fmt: skip
OLMOE = dict(  # OLMoE-1B-7B-0924's config.json sizes
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False, tie_word_embeddings=False,
)  # fmt: skip


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field of this process (``VmHWM``: peak resident set), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def read_bandwidth_gbs(gib: float = 2.0, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s) with 2 threads: :func:`moelab.hardware.measure_read_bandwidth`."""
    from moelab.hardware import measure_read_bandwidth

    return measure_read_bandwidth(gib, repeats)


# ----------------------------------------------------------------------------- stages (one process each)


def stage_write(folder: Path) -> dict:
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from moelab.data.tokenizer import BytesTokenizer
    from moelab.outputs import temporary_sibling

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = OlmoeConfig(**OLMOE, torch_dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    model = OlmoeForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    tmp = temporary_sibling(folder)  # renamed into place only once whole; the sweep knows the name
    model.save_pretrained(tmp, max_shard_size="2GB", safe_serialization=True)
    BytesTokenizer().save(tmp)
    tmp.rename(folder)
    return {"parameters": params, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def _decode(model, prompt_len: int, new_tokens: int) -> dict:
    """Greedy batch-1 decode: prefill timed alone (one new token), decode = the rest."""
    import torch

    from moelab.infer.generate import SamplingParams, generate

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 256, (prompt_len,), generator=g).tolist()
    params = SamplingParams(max_new_tokens=1, stop_at_eos=False)
    generate(model, [prompt[:8]], params)  # warm-up
    t0 = time.perf_counter()
    generate(model, [prompt], params)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, [prompt], SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False))
    total = time.perf_counter() - t0
    n = len(out[0].token_ids)
    return {"prompt_tokens": prompt_len, "new_tokens": n, "prefill_s": prefill,
            "decode_tok_s": (n - 1) / max(total - prefill, 1e-9)}  # fmt: skip


def stage_load_decode(folder: Path, new_tokens: int) -> dict:
    import torch

    from moelab.calc import arch_from_config, decode_tokens_per_s
    from moelab.convert.load import load_checkpoint_model

    torch.set_num_threads(os.cpu_count() or 1)
    base = rss_mb()
    t0 = time.perf_counter()
    model, _ = load_checkpoint_model(folder, dtype="bf16")
    load_s = time.perf_counter() - t0
    after_load = peak_rss_mb()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    decode = _decode(model, 64, new_tokens)
    del model
    bw = read_bandwidth_gbs()
    arch = arch_from_config(_model_cfg(folder))
    return {"load_s": load_s, "rss_before_mb": base, "peak_rss_after_load_mb": after_load,
            "weight_mb": weight_bytes / 2**20, **decode, "bandwidth_gbs": bw,
            "calc_decode_tok_s": decode_tokens_per_s(arch, bw, "bf16", context=64)}  # fmt: skip


def stage_int4_decode(folder: Path, new_tokens: int) -> dict:
    import torch

    from moelab.calc import _read_per_token, arch_from_config, count, decode_tokens_per_s
    from moelab.convert.load import load_checkpoint_model

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model, _ = load_checkpoint_model(folder)
    load_s = time.perf_counter() - t0
    decode = _decode(model, 64, new_tokens)
    del model
    bw = read_bandwidth_gbs()
    cfg = _model_cfg(folder)
    arch = arch_from_config(cfg)
    p = count(arch)
    # int4 g32 experts: 4 bits + a bf16 scale and zero per 32 weights = 5 bits/weight; the rest bf16
    routed_bytes = p.routed_active * 5 / 8
    other_bytes = (_read_per_token(arch) - p.routed_active) * 2  # calc's per-token reads, no embedding
    return {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), **decode, "bandwidth_gbs": bw,
            "calc_decode_tok_s": bw * 1e9 / (routed_bytes + other_bytes),
            "calc_decode_tok_s_bf16": decode_tokens_per_s(arch, bw, "bf16")}  # fmt: skip


def _model_cfg(folder: Path):
    from moelab.checkpoint.folder import read_run_config

    if (folder / "config.json").is_file():
        from moelab.convert.hf import config_from_hf

        return config_from_hf(json.loads((folder / "config.json").read_text()))
    return read_run_config(folder).model


LORA = {"rank": 8, "alpha": 16, "batch_size": 2, "seq_len": 256}


def lora_stage(hf: Path, run: Path, steps: int) -> dict:
    """LoRA fine-tune of the bf16 folder in a fresh process; tokens/s from the run's own metrics (steps after the first)."""
    from moelab.config import LoRAConfig
    from moelab.model.lora import lora_counts
    from moelab.model.sizes import training_bytes
    from moelab.train.logging import read_metrics

    out = run_cli(["train", "--init", str(hf), "--preset", "tiny", "--set", f"data.corpus={CORPUS}",
                   "--set", "data.max_bytes_per_domain=200000", "--set", f"data.seq_len={LORA['seq_len']}",
                   "--set", f"train.lora.rank={LORA['rank']}", "--set", f"train.lora.alpha={LORA['alpha']}",
                   "--set", "train.precision=bf16", "--set", f"train.batch_size={LORA['batch_size']}",
                   "--set", f"train.steps={steps}", "--set", "train.warmup_steps=1", "--set", f"train.eval_every={steps}",
                   "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--set", "train.keep_last=1",
                   "--set", "train.lr=1e-3", "--out", str(run), "--overwrite", "--no-progress"])  # fmt: skip
    records = read_metrics(run)
    train = [r for r in records if r.get("kind") == "train"]
    rates = sorted(r["tokens_per_s"] for r in train[1:])
    cfg = _model_cfg(hf)
    adapters, trainable = lora_counts(cfg, LoRAConfig(rank=LORA["rank"], alpha=LORA["alpha"]))
    tokens = LORA["batch_size"] * LORA["seq_len"]
    bound = training_bytes(cfg, tokens, 2, 2, adapters, trainable)
    from moelab.calc import arch_from_config, count

    active = count(arch_from_config(cfg)).active
    rate = rates[len(rates) // 2]
    return {**out, "steps": steps, "tokens_per_step": tokens, "tokens_per_s": rate, "adapters": adapters,
            "trainable": trainable, "active_params": active, "gflops": 4 * active * rate / 1e9,
            "memory_bound_mb": bound.total / 2**20, "losses": [r["loss"] for r in train],
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r]}  # fmt: skip


def run_stage(name: str, argv: list[str], env: dict | None = None) -> dict:
    """Run ``python real_size.py --stage NAME ARGV`` in a fresh process; return its JSON line."""
    cmd = [sys.executable, __file__, "--stage", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(args: list[str]) -> dict:
    """``moelab ARGS`` in a fresh process (stage ``cli``): its seconds and its own peak RSS."""
    return run_stage("cli", ["-", *args])


def stage_cli(args: list[str]) -> dict:
    """Run ``moelab ARGS`` in this process; its output goes to stderr so the JSON line stays last on stdout."""
    import contextlib

    from moelab.cli import main as moelab_main

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = moelab_main(args)
    if code != 0:
        raise SystemExit(code)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/real-size", help="folder for the model copies (≈20 GB)")
    ap.add_argument("--out", default="benchmarks/results/real-size", help="OUT.json and OUT.md")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier OUT.json / OUT.md")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--analyze-tokens", type=int, default=8192)
    ap.add_argument("--lora-steps", type=int, default=6)
    ap.add_argument("--only", choices=["lora"], help="run this stage alone and add it to an earlier OUT.json")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("folder", nargs="?", help=argparse.SUPPRESS)
    if "--stage" in sys.argv and "cli" in sys.argv and "-" in sys.argv:  # --stage cli - MOELAB ARGS
        print(json.dumps(stage_cli(sys.argv[sys.argv.index("-") + 1 :])))
        return
    args = ap.parse_args()
    if args.stage:
        folder = Path(args.folder)
        fn = {"write": lambda: stage_write(folder), "load-decode": lambda: stage_load_decode(folder, args.new_tokens),
              "int4-decode": lambda: stage_int4_decode(folder, args.new_tokens)}[args.stage]  # fmt: skip
        print(json.dumps(fn()))
        return

    out = Path(args.out)
    taken = [f for f in (out.with_suffix(".json"), out.with_suffix(".md")) if f.exists()]
    if taken and not args.overwrite and not args.only:  # refused before ten minutes of work, not after
        raise SystemExit(f"{taken[0]} exists: give another --out, or --overwrite to replace it")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf, q4, analysis = work / "olmoe-shaped", work / "olmoe-shaped-int4", work / "analysis"
    result: dict = {"model": "OLMoE-1B-7B-shaped, random weights", "config": OLMOE, "threads": os.cpu_count()}
    if args.only and not out.with_suffix(".json").is_file():
        raise SystemExit(f"--only {args.only} adds to an earlier {out.with_suffix('.json')}, which does not exist")
    if not hf.is_dir():
        result["write"] = run_stage("write", [str(hf)])
    if args.only == "lora":
        result = {**json.loads(out.with_suffix(".json").read_text()), "lora": lora_stage(hf, work / "lora-run", args.lora_steps)}
        _write_results(out, result)
        return
    shards = sorted(hf.glob("*.safetensors"))
    result["files"] = {"shards": len(shards), "bytes": sum(f.stat().st_size for f in shards)}
    result["load_decode_bf16"] = run_stage("load-decode", [str(hf), "--new-tokens", str(args.new_tokens)])
    result["analyze"] = run_cli(["analyze", str(hf), "--data", str(CORPUS / "valid.jsonl.gz"), "--dtype", "bf16",
                                 "--max-tokens", str(args.analyze_tokens), "--drop-tokens", str(args.analyze_tokens),
                                 "--batch-size", "4", "--seq-len", "512", "--out", str(analysis), "--overwrite",
                                 "--no-progress"])  # fmt: skip
    result["analyze"]["tokens_traced"] = 3 * args.analyze_tokens  # routing, then drops by position and by score
    result["quantize_int4"] = run_cli(["quantize", str(hf), "--bits", "4", "--group", "32", "--only", "experts",
                                       "--dtype", "bf16", "--out", str(q4), "--overwrite"])  # fmt: skip
    result["files"]["int4_bytes"] = sum(f.stat().st_size for f in q4.glob("*.safetensors"))
    result["load_decode_int4"] = run_stage("int4-decode", [str(q4), "--new-tokens", str(args.new_tokens)])
    result["lora"] = lora_stage(hf, work / "lora-run", args.lora_steps)

    _write_results(out, result)


def _write_results(out: Path, result: dict) -> None:
    from moelab.outputs import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    ld, q, li, an = r["load_decode_bf16"], r["quantize_int4"], r["load_decode_int4"], r["analyze"]
    gb = r["files"]["bytes"] / 1e9
    rows = [
        ("weights on disk (bf16, transformers' shards)", f"{gb:.2f} GB in {r['files']['shards']} shards", ""),
        ("streamed load, bf16", f"{ld['load_s']:.1f} s, peak RSS {ld['peak_rss_after_load_mb'] / 1024:.2f} GiB",
         f"weights {ld['weight_mb'] / 1024:.2f} GiB; bound 1.25× + 0.3 GB = "
         f"{(1.25 * ld['weight_mb'] + 300) / 1024:.2f} GiB"),
        ("`moelab analyze --dtype bf16` (load, routing trace, corrected specialisation, drops)",
         f"{an['seconds']:.0f} s, peak RSS {an['peak_rss_mb'] / 1024:.2f} GiB",
         f"{an['tokens_traced']:,} tokens traced: {an['tokens_traced'] / max(an['seconds'] - ld['load_s'], 1e-9):.0f} "
         "tokens/s after the load"),
        ("decode bf16, batch 1", f"{ld['decode_tok_s']:.2f} tok/s (prefill 64: {ld['prefill_s']:.1f} s)",
         f"calc: {ld['calc_decode_tok_s']:.2f} tok/s at {ld['bandwidth_gbs']:.1f} GB/s"),
        ("`moelab quantize --bits 4 --only experts` (streamed)",
         f"{q['seconds']:.0f} s, peak RSS {q['peak_rss_mb'] / 1024:.2f} GiB",
         f"int4 checkpoint {r['files']['int4_bytes'] / 1e9:.2f} GB"),
        ("decode int4 g32 experts, batch 1", f"{li['decode_tok_s']:.2f} tok/s (prefill 64: {li['prefill_s']:.1f} s)",
         f"calc: {li['calc_decode_tok_s']:.2f} tok/s at {li['bandwidth_gbs']:.1f} GB/s"),
    ]
    if "lora" in r:
        lo = r["lora"]
        rows.append((
            f"`moelab train --init` LoRA r={LORA['rank']} on attention + experts, bf16 base, "
            f"{lo['steps']} steps of {lo['tokens_per_step']} tokens",
            f"{lo['seconds']:.0f} s, peak RSS {lo['peak_rss_mb'] / 1024:.2f} GiB; {lo['tokens_per_s']:.0f} tokens/s",
            f"weights {ld['weight_mb'] / 1024:.2f} GiB, memory check's lower bound {lo['memory_bound_mb'] / 1024:.2f} GiB; "
            f"{lo['trainable']:,} parameters trained; {lo['gflops']:.0f} GFLOP/s (4 × {lo['active_params'] / 1e9:.2f}B "
            "active per token: forward + input gradients)",
        ))  # fmt: skip
    lines = ["| what | measured | beside it |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
