"""`moelab bench-decode`: prefill and decode tok/s of the fast path against transformers' `generate`.

One process, one run: the MoE model and its iso-active dense twin, each in fp32 / bf16 / int8 /
int4 (weight-only, activations in the fast dtype), at batch 1 and batch B, and transformers'
``generate`` on the same weights exported through the HF interop (Mixtral for the MoE, Llama
for the twin). Noise between runs on a shared CPU is 20–40%, so compare ratios within one run.

Timing: prefill = one pass over ``prompt`` tokens per row (tok/s counts B·prompt tokens);
decode = ``new`` cached steps after one warm-up step (tok/s counts B tokens a step). For
transformers, decode time is ``generate(new+1) − generate(1)`` (both greedy, EOS disabled).
Every variant is built first and then timed once per round, the order rotating each round; the
moelab variants of one batch size decode with their steps interleaved (step t of each, then step
t + 1), so every moelab ratio compares steps milliseconds apart; a row is the median over rounds
(``--rounds``) and a ratio the median of the per-round ratios.
Memory: bytes of the variant's weights, and the process's resident set (VmRSS) at the end, with
every variant loaded.

Results go to fixed names (``decode.{json,md}``, ``--quick``: ``decode-quick.*``; the docs cite
them), so a run never replaces an earlier result unless asked (``--overwrite``), and then only
files bench-decode wrote (:func:`check_results`); both files are written in one step each.

Legend: B batch rows, P prompt tokens, N decoded tokens.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from moelab.config import ModelConfig, MoEConfig
from moelab.errors import UserError
from moelab.hardware import describe, measure_read_bandwidth
from moelab.infer.fast_decode import FastDecoder, cast_for_decode, decode_dtype
from moelab.infer.packed import packed_bytes
from moelab.outputs import atomic_write_text

DTYPES = ("fp32", "bf16", "int8", "int4")
PEER_WEIGHTS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # llama.cpp's type for each moelab dtype


def mixtral_shaped() -> ModelConfig:
    """The issue's default: d 768, 8 layers, 12 heads, 4 KV heads, 8 experts top-2 of hidden 1536,
    vocab 32000, untied head (288M parameters)."""
    return ModelConfig(
        vocab_size=32000, d_model=768, n_layers=8, n_heads=12, n_kv_heads=4, ffn_hidden=3072,
        max_seq_len=1024, tie_embeddings=False, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=1536),
    )  # fmt: skip


@dataclass
class Row:
    model: str  # "moe" or "dense"
    impl: str  # "moelab" or "transformers"
    dtype: str
    batch: int
    prefill_tok_s: float
    decode_tok_s: float
    weights_mib: float
    rss_mib: float
    decode_rounds: list[float] = field(default_factory=list)  # decode tok/s of each round, in round order
    bytes_per_token: float = 0.0  # moelab rows: what a decode step reads per token (moelab.infer.read_bytes)
    of_bound: float = 0.0  # bytes/token × tok/s ÷ the round's measured read bandwidth (median over rounds)


@dataclass
class DecodeBenchResult:
    prompt: int
    new_tokens: int
    host: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    bandwidth_gbs: list[float] = field(default_factory=list)  # memory read bandwidth measured before each round

    def get(self, model: str, impl: str, dtype: str, batch: int) -> Row | None:
        for r in self.rows:
            if (r.model, r.impl, r.dtype, r.batch) == (model, impl, dtype, batch):
                return r
        return None

    def ratios(self) -> list[tuple[str, float]]:
        """The issue's acceptance ratios (decode tok/s), for every batch measured: the median over
        rounds of each round's ratio (the two sides of a ratio run next to each other in every
        round, so a shift in the machine's speed between rounds cancels), or the ratio of the
        medians for rows without per-round samples."""
        out = []
        for b in sorted({r.batch for r in self.rows}):
            def dec(model, impl, dtype, b=b):
                return self.get(model, impl, dtype, b)

            pairs = [
                ("moelab bf16 / transformers bf16 (MoE)", dec("moe", "moelab", "bf16"), dec("moe", "transformers", "bf16")),
                ("moelab int8 / moelab bf16 (MoE)", dec("moe", "moelab", "int8"), dec("moe", "moelab", "bf16")),
                ("moelab int4 / moelab bf16 (MoE)", dec("moe", "moelab", "int4"), dec("moe", "moelab", "bf16")),
            ] + [(f"MoE / dense twin, moelab {d}", dec("moe", "moelab", d), dec("dense", "moelab", d)) for d in DTYPES]
            pairs += [
                (f"moelab {d} / llama.cpp {PEER_WEIGHTS[d]} ({label})", dec(m, "moelab", d), dec(m, "llama.cpp", d))
                for d in DTYPES
                for m, label in (("moe", "MoE"), ("dense", "dense"))
            ]
            out += [(f"{name}, batch {b}", paired_ratio(a, c)) for name, a, c in pairs if a and c]
        return out

    def to_markdown(self) -> str:
        lines = [
            f"prompt {self.prompt} tokens, {self.new_tokens} decoded; torch {self.host.get('torch')}, "
            f"{self.host.get('threads')} threads, bf16 units: {self.host.get('cpu_bf16_units')}, "
            f"native kernels: {self.host.get('native_kernels')}",
            "",
            "| model | impl | weights | batch | prefill tok/s | decode tok/s | weights MiB | RSS MiB "
            "| MB read / token | of the bandwidth bound |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            bound = f"{r.bytes_per_token / 1e6:.1f} | {100 * r.of_bound:.0f}%" if r.bytes_per_token else " | "
            lines.append(
                f"| {r.model} | {r.impl} | {r.dtype} | {r.batch} | {r.prefill_tok_s:.0f} | {r.decode_tok_s:.1f} "
                f"| {r.weights_mib:.0f} | {r.rss_mib:.0f} | {bound} |"
            )
        if self.bandwidth_gbs:
            bw = ", ".join(f"{b:.1f}" for b in self.bandwidth_gbs)
            lines += ["", f"Memory read bandwidth measured before each round (GB/s, a 1 GiB bf16 sum): {bw}. "
                      "'Of the bound' = MB read per token × decode tok/s ÷ the bandwidth of the same round, median "
                      "over rounds; MB read per token from the decode copy's own storage (experts at batch B: the "
                      "expected distinct ones under uniform routing; KV cache at the mean context)."]  # fmt: skip
        lines += ["", "| ratio (decode; median of the per-round ratios, one run) | value |", "|---|---:|"]
        lines += [f"| {name} | {v:.2f} |" for name, v in self.ratios()]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "new_tokens": self.new_tokens,
            "host": self.host,
            "rows": [asdict(r) for r in self.rows],
            "bandwidth_gbs": self.bandwidth_gbs,
            "ratios": dict(self.ratios()),
        }


def paired_ratio(a: Row, b: Row) -> float:
    """Median of the per-round ratios a/b when both rows have the same rounds, else of the medians."""
    if a.decode_rounds and len(a.decode_rounds) == len(b.decode_rounds):
        return statistics.median(x / y for x, y in zip(a.decode_rounds, b.decode_rounds))
    return a.decode_tok_s / b.decode_tok_s


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def weights_mib(model: nn.Module) -> float:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return (sum(seen.values()) + packed_bytes(model)) / 2**20


def read_per_token(model: nn.Module, batch: int, context: int) -> float:
    """Bytes a fast-path decode step of ``batch`` rows at ``context`` positions reads per token."""
    from moelab.infer.read_bytes import step_bytes
    from moelab.model.kv_cache import make_cache

    cache = make_cache("static", model, 1, 1)  # one row, one position: the cache's bytes per position
    return step_bytes(model, batch, context, float(cache.storage_bytes)).per_token


def variant(base: nn.Module, dtype: str, group: int) -> nn.Module:
    """``base`` (fp32) as the fast path runs it: cast, or weight-only quantized (experts and every
    linear outside routers) with activations in the fast dtype."""
    from moelab.quant.model import prepack, quantize_model

    if dtype in ("fp32", "bf16"):
        return cast_for_decode(base, torch.float32 if dtype == "fp32" else torch.bfloat16)
    m = cast_for_decode(base, decode_dtype("cpu"), pack=False)
    if dtype in ("int8", "int4"):
        m = prepack(quantize_model(m, bits=8 if dtype == "int8" else 4, group_size=group, only="all"))
    return m


def prompt_ids(batch: int, prompt: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """The random prompts ``[B, P]`` every engine is timed on (the same ids for the same seed)."""
    return torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def time_moelab(model: nn.Module, batch: int, prompt: int, new: int, seed: int = 0) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one model on the fast path: one prefill of ``prompt`` tokens
    per row, one warm-up step, then ``new`` greedy steps."""
    return time_moelab_interleaved([model], batch, prompt, new, seed)[0]


@torch.no_grad()
def time_moelab_interleaved(
    models: list[nn.Module], batch: int, prompt: int, new: int, seed: int = 0, chunk: int = 8
) -> list[tuple[float, float]]:
    """Prefill and decode tok/s for several models at once, their decode steps interleaved in chunks:
    ``chunk`` steps of every model in turn, until each has decoded ``new`` tokens. Returns
    (prefill tok/s, decode tok/s) per model.

    Why: this machine's memory bandwidth jumps between two levels (≈ 33 and ≈ 48 GB/s) every few
    seconds; timing one model's 64 steps and then another's compares different levels, while
    chunks tens of milliseconds apart see the same one. Why chunks and not single steps: a model
    whose step follows another model's finds none of its weights in the caches; after its first
    step in a chunk it decodes as it would alone (the smaller quantized models keep part of their
    working set in the 32 MB L3 from step to step, and single-step interleaving took that away).
    """
    ids = prompt_ids(batch, prompt, models[0].cfg.vocab_size, seed)
    decoders, logits, prefill = [], [], []
    for m in models:
        dec = FastDecoder(m, batch, prompt + new + 1)
        t0 = time.perf_counter()
        lg = dec.prefill(ids)
        prefill.append(batch * prompt / (time.perf_counter() - t0))
        decoders.append(dec)
        logits.append(dec.step(lg.float().argmax(-1, keepdim=True)))  # warm-up step
    spent = [0.0] * len(models)
    for start in range(0, new, chunk):
        for i, dec in enumerate(decoders):
            t0 = time.perf_counter()
            for _ in range(min(chunk, new - start)):
                logits[i] = dec.step(logits[i].float().argmax(-1, keepdim=True))
            spent[i] += time.perf_counter() - t0
    return [(p, batch * new / s) for p, s in zip(prefill, spent)]


@torch.no_grad()
def time_transformers(hf_model, batch: int, prompt: int, new: int, vocab: int, seed: int = 0) -> tuple[float, float]:
    ids = prompt_ids(batch, prompt, vocab, seed)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run(n: int) -> float:
        t0 = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1 = run(1)
    tn = run(new + 1)
    return batch * prompt / t1, batch * new / max(tn - t1, 1e-9)


def export_for_hf(model: nn.Module, folder: Path) -> Path:
    """Export ``model`` once as a Hugging Face folder that :func:`load_hf` reads in each dtype.

    ``folder`` must be new (a fresh temporary folder's child): nothing is ever exported over it."""
    from moelab.convert.hf import export_hf

    return export_hf(model, folder, overwrite=False)


def load_hf(folder: Path, dtype: torch.dtype):
    """transformers' model from the exported ``folder``, in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def run_decode_bench(
    moe: nn.Module,
    dense: nn.Module,
    dtypes: tuple[str, ...] = DTYPES,
    batches: tuple[int, ...] = (1, 8),
    prompt: int = 128,
    new: int = 64,
    group: int = 32,
    hf_dtypes: tuple[str, ...] = ("fp32", "bf16"),
    rounds: int = 3,
    log=print,
    peer: str | None = None,
) -> DecodeBenchResult:
    """Build every (model, impl, dtype) variant first, then, once per round (the order rotating
    each round): all moelab variants of one batch size with their decode steps interleaved in
    chunks (:func:`time_moelab_interleaved`), and each transformers candidate. A row is the median over
    rounds, a ratio the median of per-round ratios (:func:`paired_ratio`).

    Why interleaved: on a shared CPU the speed drifts by 20–40% within minutes (here the memory
    bandwidth a VM gets jumps by up to 50% every few seconds); measuring each variant in its own
    stretch of time turns that drift into fake ratios.

    ``peer="llama.cpp"``: each model is also written as GGUF (:mod:`moelab.convert.gguf`; bf16, q8_0, q4_0
    or f32 for moelab's bf16, int8, int4, fp32) and timed in llama.cpp (:mod:`moelab.infer.llama_cpp_peer`)
    with the run's thread count, one unit per (model, dtype, batch) like transformers'. llama.cpp's
    weights are moelab's fp32 weights quantized by llama.cpp's own formats (q4_0: blocks of 32 with one
    f16 scale; moelab's int4: groups of ``group`` with a bf16 scale and zero).
    """
    from moelab.native.build import describe as native_kernels

    res = DecodeBenchResult(prompt=prompt, new_tokens=new, host=describe("cpu") | {"native_kernels": native_kernels()})
    Key = tuple[str, str, str, int]  # (model, impl, dtype, batch)
    # a unit of timing: the rows it measures, their models, and a function returning one (prefill, decode) per row
    units: list[tuple[list[Key], list[nn.Module], Callable[[], list[tuple[float, float]]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {(name, dtype): variant(base, dtype, group) for name, base in (("moe", moe), ("dense", dense)) for dtype in dtypes}
        for b in batches:  # every moelab variant of one batch size, steps interleaved
            keys = [(name, "moelab", dtype, b) for (name, dtype) in built]
            models = [built[(k[0], k[2])] for k in keys]
            units.append((keys, models, partial(time_moelab_interleaved, models, b, prompt, new)))
        for name, base in (("moe", moe), ("dense", dense)):
            if not hf_dtypes:
                continue
            folder = export_for_hf(base, Path(tmp) / name)  # exported once, loaded in every dtype
            for dtype in hf_dtypes:
                hf = load_hf(folder, torch.float32 if dtype == "fp32" else torch.bfloat16)
                vocab = base.cfg.vocab_size
                for b in batches:
                    fn = partial(time_transformers, hf, b, prompt, new, vocab)
                    units.append(([(name, "transformers", dtype, b)], [hf], lambda fn=fn: [fn()]))
        if peer == "llama.cpp":
            units += llama_cpp_units(moe, dense, dtypes, batches, prompt, new, Path(tmp), log)
        samples: dict[Key, list[tuple[float, float]]] = {k: [] for keys, _, _ in units for k in keys}
        for r in range(rounds):
            res.bandwidth_gbs.append(measure_read_bandwidth())  # the bound of this round's figures
            shift = r % len(units)
            for keys, _, fn in units[shift:] + units[:shift]:
                for key, sample in zip(keys, fn()):
                    samples[key].append(sample)
                    pre, dec = sample
                    log(f"  round {r + 1}/{rounds} {key[0]:5s} {key[1]:12s} {key[2]:4s} batch {key[3]}: "
                        f"prefill {pre:7.0f} tok/s, decode {dec:6.1f} tok/s")  # fmt: skip
        rss = rss_mib()
        impls = ("moelab", "llama.cpp", "transformers")
        order = sorted(samples, key=lambda k: (k[3], DTYPES.index(k[2]), impls.index(k[1]), k[0]))
        model_of = {k: m for keys, models, _ in units for k, m in zip(keys, models)}
        for key in order:
            pre = statistics.median(s[0] for s in samples[key])
            dec = statistics.median(s[1] for s in samples[key])
            mib = model_of[key].file_mib if key[1] == "llama.cpp" else weights_mib(model_of[key])
            row = Row(*key, pre, dec, mib, rss, [s[1] for s in samples[key]])
            if key[1] == "moelab":
                row.bytes_per_token = read_per_token(model_of[key], key[3], prompt + new // 2)
                row.of_bound = statistics.median(
                    row.bytes_per_token * tok_s / (bw * 1e9) for tok_s, bw in zip(row.decode_rounds, res.bandwidth_gbs)
                )
            res.rows.append(row)
    for _, models, _ in units:
        for m in models:
            if hasattr(m, "close"):
                m.close()  # llama.cpp contexts: freed before their files' folder goes
    del units, built
    gc.collect()
    return res


def llama_cpp_units(
    moe: nn.Module, dense: nn.Module, dtypes: tuple[str, ...], batches: tuple[int, ...], prompt: int, new: int,
    folder: Path, log=print,
) -> list:
    """Timing units for llama.cpp (see :func:`run_decode_bench`): each model exported once per dtype,
    one context per batch size."""
    from moelab.convert.gguf import export_gguf
    from moelab.infer.llama_cpp_peer import LlamaCppModel, time_llama_cpp

    units = []
    threads = torch.get_num_threads()
    for name, base in (("moe", moe), ("dense", dense)):
        for dtype in dtypes:
            path = export_gguf(base, folder / f"{name}-{PEER_WEIGHTS[dtype]}.gguf", PEER_WEIGHTS[dtype])
            log(f"  wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) for llama.cpp")
            for b in batches:
                peer = LlamaCppModel(path, b, prompt + new + 2, threads)
                fn = partial(time_llama_cpp, peer, prompt_ids(b, prompt, base.cfg.vocab_size).tolist(), new)
                units.append(([(name, "llama.cpp", dtype, b)], [peer], lambda fn=fn: [fn()]))
    return units


RESULT_KEYS = frozenset({"prompt", "new_tokens", "host", "rows"})  # DecodeBenchResult.to_json()
TABLE_HEADER = "| model | impl | weights | batch | prefill tok/s | decode tok/s | weights MiB | RSS MiB |"


def is_decode_result(path: Path) -> bool:
    """Whether ``path`` is a file bench-decode wrote: a :class:`DecodeBenchResult`'s JSON, or its table."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix != ".json":  # tables written before the bandwidth columns existed start the same way
        return any(line.startswith(TABLE_HEADER) for line in text.splitlines())
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and set(data) >= RESULT_KEYS


def check_results(out_dir: str | Path, stem: str = "decode", overwrite: bool = False) -> tuple[Path, Path]:
    """Refuse results that would replace files (call before anything is timed); return the two paths.

    ``STEM.json``/``STEM.md`` already there are replaced only with ``overwrite``, and only when each
    is a bench-decode result (:func:`is_decode_result`); a ``out_dir`` that is a file is refused.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: give the folder for {stem}.json and {stem}.md")
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    for path in paths:
        if not os.path.lexists(path):
            continue
        if not overwrite:
            raise UserError(
                f"{path} already exists: bench-decode never replaces an earlier result; pass --overwrite to "
                f"replace {stem}.json and {stem}.md, or give another --out"
            )
        if not is_decode_result(path):
            raise UserError(
                f"--overwrite: {path} is not a bench-decode result, and moelab replaces only its own: "
                "move it away or give another --out"
            )
    return paths


def write_results(
    res: DecodeBenchResult, out_dir: str | Path, stem: str = "decode", overwrite: bool = False
) -> tuple[Path, Path]:
    """``STEM.json`` and ``STEM.md`` in ``out_dir``, each written in one step, after :func:`check_results`."""
    js, md = check_results(out_dir, stem, overwrite)
    js.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(js, json.dumps(res.to_json(), indent=2) + "\n")
    atomic_write_text(md, res.to_markdown())
    return js, md


__all__ = [
    "DecodeBenchResult",
    "Row",
    "check_results",
    "is_decode_result",
    "mixtral_shaped",
    "run_decode_bench",
    "variant",
    "write_results",
]
