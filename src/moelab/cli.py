"""`moelab <command>`: the only place that parses arguments.

Each command is a pair of functions registered in ``COMMANDS``: one adds its arguments to a
subparser, one runs it with the parsed namespace. Errors a user can act on (``ConfigError``,
``UserError``) print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moelab.config import ConfigError
from moelab.errors import UserError


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``run(args)`` as ``moelab NAME``."""

    def decorator(run: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int | None]:
        COMMANDS[name] = Command(help, add_arguments or (lambda p: None), run)
        return run

    return decorator


# ----------------------------------------------------------------------------- shared argument groups


def add_model_config_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="model config, YAML or JSON")
    src.add_argument("--preset", metavar="NAME", help="named model config (smoke, tiny, small)")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a config field, e.g. --set moe.num_experts=16 (repeatable)",
    )


def model_config_from_args(args: argparse.Namespace, default_preset: str = "tiny"):
    from moelab.config import apply_overrides, load_config, preset
    from moelab.moe.validate import check_model_config

    cfg = load_config(args.config) if args.config else preset(args.preset or default_preset)
    return check_model_config(apply_overrides(cfg, args.overrides))  # router names and options, resolved


def _add_allow_large_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-large",
        action="store_true",
        help="build the model even when its size exceeds the free memory (= MOELAB_ALLOW_LARGE=1)",
    )


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="load the weights in this dtype, streamed tensor by tensor (default: as stored; routers stay fp32)")


def _load_source(path: str, dtype: str | None = None):
    """``(model, folder read)`` of a model folder (moelab or Hugging Face), a checkpoint or a run folder
    (its newest complete checkpoint): what ``generate`` and ``analyze`` take, for the conversion commands."""
    from moelab.convert.load import load_checkpoint_model

    return load_checkpoint_model(path, dtype=dtype)


@contextlib.contextmanager
def _allow_large_env(on: bool):
    """``--allow-large`` as ``MOELAB_ALLOW_LARGE=1`` for one command: the memory guard sits in the
    model builders, which no flag reaches, and side-by-side runs inherit the environment."""
    import os

    from moelab.model.memory_guard import ALLOW_ENV

    saved = os.environ.get(ALLOW_ENV)
    if on:
        os.environ[ALLOW_ENV] = "1"
    try:
        yield
    finally:
        if on and saved is None:
            os.environ.pop(ALLOW_ENV, None)
        elif on:
            os.environ[ALLOW_ENV] = saved


# Every --seed seeds torch generators, some with small offsets added (row i of generate uses seed + i,
# evaluation batches seed + 1): a 63-bit range keeps each derived seed within torch's 64-bit seeds.
SEED_MAX = 2**63 - 1


def _check_seed(args: argparse.Namespace) -> None:
    """UserError naming the valid range when a command's ``--seed`` is negative or too large."""
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed={seed} is invalid: must be an integer in [0, 2**63 - 1 = {SEED_MAX}]")


# ----------------------------------------------------------------------------- commands


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_model_config_args(p)
    p.add_argument("--twin", choices=["iso_active", "iso_total", "iso_flop"], help="print the dense twin instead")
    p.add_argument("--out", metavar="FILE", help="also write the resolved config to FILE (.yaml or .json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@command("config", "print a resolved model config and its parameter counts", _add_config_args)
def _run_config(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console

    from moelab.config import config_text, to_dict
    from moelab.model.sizes import config_param_count
    from moelab.model.twins import dense_twin
    from moelab.outputs import atomic_write_text

    if args.out and Path(args.out).exists() and not (args.overwrite and Path(args.out).is_file()):
        what = "a folder" if Path(args.out).is_dir() else "a file that exists"
        raise UserError(f"--out {args.out} is {what}: give a new file name" +
                        ("" if Path(args.out).is_dir() else ", or --overwrite to replace it"))  # fmt: skip
    cfg = model_config_from_args(args)
    if args.twin:
        cfg = dense_twin(cfg, args.twin)
    console = Console()
    console.print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    counts = config_param_count(cfg)  # arithmetic on the config: nothing is built, any size can be counted
    console.print(
        f"[bold]parameters[/]: total {counts.total:,}  active/token {counts.active:,}  "
        f"embedding {counts.embedding:,}  router {counts.router:,}"
    )
    if args.out:
        atomic_write_text(args.out, config_text(cfg, Path(args.out).suffix))
    return 0


def _add_routers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="print docs/routers.md's routers table, generated from the registry")


@command("routers", "list the registered routers (one line each, then its options), dispatch backends, balance losses and drop policies", _add_routers_args)
def _run_routers(args: argparse.Namespace) -> int:
    from moelab.moe.capacity import DROP_POLICIES
    from moelab.moe.dispatch import DISPATCHERS
    from moelab.moe.losses import BALANCE_LOSSES
    from moelab.moe.routers import ROUTERS

    if args.markdown:
        from moelab.moe.routers.table import router_table_markdown

        print(router_table_markdown(), end="")
        return 0
    from moelab.moe.routers.table import options_cell

    width = max(map(len, ROUTERS))
    print("routers (moe.router.name):")
    for name, cls in ROUTERS.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        flags = ", ".join(
            flag
            for flag, on in (
                ("learned" if cls.learned else "fixed", True),
                ("not causal", not cls.causal_safe),
                ("needs token ids", cls.needs_token_ids),
            )
            if on
        )
        print(f"  {name:<{width}}  {summary}  [{flags}]")
        print(f"  {'':<{width}}  options: {options_cell(cls).replace('`', '')}")
    print(f"balance losses (moe.aux_loss): {', '.join(BALANCE_LOSSES)}; also z_loss")
    print(f"drop policies (moe.drop_policy): {', '.join(DROP_POLICIES)}")
    print(f"dispatch backends (moe.dispatch): {', '.join(DISPATCHERS)}")
    return 0


def _add_bench_dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, default=1, metavar="N", help="expert-parallel ranks (divides the world size)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--global-batch", type=int, default=16, metavar="N", help="sequences per step over all ranks")
    p.add_argument("--seq", type=int, default=128, metavar="N", help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=128, metavar="N")
    p.add_argument("--experts", type=int, default=8, metavar="E")
    p.add_argument("--mode", default="ddp", help="data-parallel mode: a name in moelab.parallel.wrap (manual, ddp, fsdp)")


@command("bench-dist", "distributed throughput under torchrun: tokens/s and all-to-all bytes per step (JSON line)",
         _add_bench_dist_args)  # fmt: skip
def _run_bench_dist(args: argparse.Namespace) -> int:
    import json

    from moelab.parallel.bench import bench

    out = bench(args.ep, args.steps, args.warmup, args.global_batch, args.seq, args.d_model, args.experts, args.mode)
    if out:  # rank 0 prints
        print(json.dumps(out))
    return 0


def _add_analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="CKPT_OR_RUN", help="checkpoint folder, or run folder (its newest checkpoint)")
    p.add_argument("--data", required=True, metavar="NAME_OR_PATH", help="labelled corpus: synthetic, builtin, a path, hf:NAME")
    p.add_argument("--out", default="analysis", metavar="DIR", help="where analysis.json, report.html and traces go")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier analysis in --out (only one holding nothing but analyze's files)")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="CKPT", help="run folder or checkpoints for routing drift")
    p.add_argument("--dense", metavar="CKPT", help="dense twin checkpoint: gradient conflict and FFN sparsity")
    p.add_argument("--max-tokens", type=int, default=65_536, help="tokens traced (default 65536)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="capacity imposed for the drops analysis")
    p.add_argument("--drop-tokens", type=int, default=16_384, help="tokens for the drops analysis")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the checkpoint's data.seq_len)")
    p.add_argument("--max-bytes-per-domain", type=int, default=2_000_000, help="corpus cap per domain label")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_dtype_arg(p)


@command("analyze", "routing analysis of a checkpoint on a labelled corpus: report.html + analysis.json", _add_analyze_args)
def _run_analyze(args: argparse.Namespace) -> int:
    from moelab.analysis.pipeline import AnalyzeOptions, analyze
    from moelab.analysis.report import specialization_lines

    for name in ("max_tokens", "batch_size", "drop_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.capacity_factor <= 0:
        raise UserError(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    opts = AnalyzeOptions(
        data=args.data, out=args.out, checkpoints=tuple(args.checkpoints), dense=args.dense,
        max_tokens=args.max_tokens, batch_size=args.batch_size, capacity_factor=args.capacity_factor,
        drop_tokens=args.drop_tokens, seq_len=args.seq_len, max_bytes_per_domain=args.max_bytes_per_domain,
        progress=not args.no_progress, overwrite=args.overwrite, dtype=args.dtype,
    )
    result = analyze(args.model, opts)
    for line in specialization_lines(result):
        print(line)
    print(f"wrote {opts.out}/report.html and {opts.out}/analysis.json")
    return 0


# ----------------------------------------------------------------------------- conversions (convert, upcycle, moefy, merge, prune)


def _add_output_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--out", metavar="DIR", required=required, help="output folder")
    p.add_argument("--to", choices=["moelab", "hf"], default="moelab", help="write a moelab folder or a Hugging Face one")
    p.add_argument("--family", metavar="MODEL_TYPE", help="Hugging Face family for --to hf (default: the one that fits)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder (only one holding nothing but model files moelab writes)")


def _write_model(model, args: argparse.Namespace, src: str) -> None:
    """Write ``model`` to ``args.out`` as ``args.to`` with the tokenizer of folder ``src`` beside it, atomically;
    a non-empty ``args.out`` only with ``--overwrite``, never onto ``src`` (``moelab.outputs``)."""
    from moelab.convert.hf import write_model_folder
    from moelab.convert.hf_files import DEFAULT_MAX_SHARD_SIZE

    shard = getattr(args, "max_shard_size", None) or DEFAULT_MAX_SHARD_SIZE
    with _warnings_as_lines():  # e.g. a tokenizer.model that could not become a tokenizer.json
        copied = write_model_folder(model, args.out, args.to, src, family=args.family, overwrite=args.overwrite,
                                    max_shard_size=shard)  # fmt: skip
    print(f"wrote {args.to} folder {args.out}" + (f" (with {', '.join(copied)})" if copied else ""))


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a Hugging Face folder (config.json + safetensors), a moelab folder, a checkpoint or a run")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=["moelab", "hf"], help="output format (default: the other one)")
    p.add_argument("--family", metavar="MODEL_TYPE", help="Hugging Face family for --to hf (llama, mixtral, …)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (only one holding nothing but model files moelab writes)")
    _add_dtype_arg(p)
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="--to hf: largest weight file, e.g. 500MB, 2GiB (default 5GB); more go to shards with an index")


@command("convert", "convert between Hugging Face folders and moelab folders", _add_convert_args)
def _run_convert(args: argparse.Namespace) -> int:
    from moelab.convert.hf import check_model_output, is_hf_folder
    from moelab.safetensors_writer import parse_size

    parse_size(args.max_shard_size)  # a bad size is refused before the load
    check_model_output(args.dst, args.src, args.overwrite)  # before the load: refuse what could lose data
    model, folder = _load_source(args.src, args.dtype)
    args.to = args.to or ("moelab" if is_hf_folder(args.src) else "hf")
    args.out = args.dst
    _write_model(model, args, str(folder))
    return 0


def _add_upcycle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="dense model: moelab or HF folder, checkpoint, or run (newest checkpoint)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1, help="split each FFN into g neuron slices (fine-grained)")
    p.add_argument("--noise", type=float, default=0.0, help="noise std on expert copies, relative to each weight's std")
    p.add_argument("--router-init", choices=["zeros", "normal"], default="zeros")
    p.add_argument("--router", default="topk", help="router name (moelab routers)")
    p.add_argument("--placement", choices=["all", "every_n", "first_k_dense", "explicit"], default="all")
    p.add_argument("--every-n", type=int, default=2)
    p.add_argument("--first-k-dense", type=int, default=1)
    p.add_argument("--layers", default="", help="placement=explicit: comma-separated layer indices")
    p.add_argument("--seed", type=int, default=0)
    _add_output_args(p)


@command("upcycle", "turn a dense checkpoint into an MoE one (sparse upcycling)", _add_upcycle_args)
def _run_upcycle(args: argparse.Namespace) -> int:
    from moelab.config import MoEConfig, RouterConfig
    from moelab.convert.hf import check_model_output
    from moelab.convert.upcycle import upcycle

    check_model_output(args.out, args.ckpt, args.overwrite)
    layers = tuple(int(x) for x in args.layers.split(",") if x.strip())
    moe = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        router=RouterConfig(name=args.router, renormalize=True),
        placement=args.placement,
        every_n=args.every_n,
        first_k_dense=args.first_k_dense,
        layers=layers,
    )
    dense, folder = _load_source(args.ckpt, "fp32")
    model = upcycle(dense, moe, args.granularity, args.noise, args.router_init, args.seed)
    print(f"upcycled: MoE layers {model.cfg.moe_layers}, {args.experts} experts of hidden {model.cfg.moe.expert_hidden}")
    _write_model(model, args, str(folder))
    return 0


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, metavar="FILE", help="text (.txt, .jsonl[.gz] with 'text'), read as bytes")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=8, help="batches of 8 sequences for calibration (and as many for evaluation)")
    p.add_argument("--seed", type=int, default=0)


def _add_moefy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="dense model: moelab or HF folder, checkpoint, or run (newest checkpoint)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4, help="k of the written model")
    p.add_argument("--ks", default="", help="comma-separated k values to report (default: 1, 2, 4, … up to E)")
    p.add_argument("--split", choices=["cluster", "random"], default="cluster")
    p.add_argument("--router", choices=["learned", "centroid"], default="learned")
    _add_data_args(p, required=True)
    _add_output_args(p, required=False)


@command("moefy", "split a dense model's FFNs into experts (MoEfication) and report the loss per k", _add_moefy_args)
def _run_moefy(args: argparse.Namespace) -> int:
    from moelab.convert.hf import check_model_output
    from moelab.convert.moefy import moefy_report, with_top_k
    from moelab.data.byte_batches import byte_batches

    if args.out:
        check_model_output(args.out, args.ckpt, args.overwrite)
    dense, folder = _load_source(args.ckpt, "fp32")
    calib = byte_batches(args.data, dense.cfg.vocab_size, args.seq_len, args.batches, args.seed)
    evaluation = byte_batches(args.data, dense.cfg.vocab_size, args.seq_len, args.batches, args.seed, offset=1)
    ks = [int(k) for k in args.ks.split(",") if k.strip()] or [
        k for k in (1, 2, 4, 8, 16, 32, 64) if k < args.experts
    ] + [args.experts]
    rows = moefy_report(dense, calib, evaluation, args.experts, sorted(set(ks) | {args.top_k}), args.split, args.router, args.seed)
    print(f"dense loss {rows[0].dense_loss:.4f}  (E={args.experts}, split={args.split}, router={args.router})")
    for r in rows:
        print(f"  k={r.top_k:<3d} loss {r.loss:.4f}  delta {r.delta:+.4f}")
    if args.out:
        from moelab.convert.moefy import moefy

        _write_model(with_top_k(moefy(dense, calib, args.experts, args.top_k, args.split, args.router, args.seed), args.top_k), args, str(folder))
    return 0


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="MoE model: moelab or HF folder, checkpoint, or run (newest checkpoint)")
    p.add_argument("--experts", type=int, required=True, help="experts per layer after merging")
    p.add_argument("--by", choices=["weight", "router"], default="weight", help="similarity used to group experts")
    _add_data_args(p, required=False)
    _add_output_args(p)


@command("merge", "merge similar experts (frequency-weighted averages when --data gives a trace)", _add_merge_args)
def _run_merge(args: argparse.Namespace) -> int:
    from moelab.convert.hf import check_model_output
    from moelab.convert.merge import expert_counts, merge_similar
    from moelab.data.byte_batches import byte_batches

    check_model_output(args.out, args.ckpt, args.overwrite)
    model, folder = _load_source(args.ckpt, "fp32")
    counts = None
    if args.data:
        counts = expert_counts(model, byte_batches(args.data, model.cfg.vocab_size, args.seq_len, args.batches, args.seed))
    _write_model(merge_similar(model, args.experts, counts, args.by), args, str(folder))
    return 0


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="MoE model: moelab or HF folder, checkpoint, or run (newest checkpoint)")
    p.add_argument("--remove", type=int, required=True, help="experts to remove per layer (the least used first)")
    _add_data_args(p, required=True)
    _add_output_args(p)


@command("prune", "remove dead or rare experts, judged on a routing trace of --data", _add_prune_args)
def _run_prune(args: argparse.Namespace) -> int:
    from moelab.convert.hf import check_model_output
    from moelab.convert.merge import expert_counts, prune_experts, rare_experts
    from moelab.data.byte_batches import byte_batches

    check_model_output(args.out, args.ckpt, args.overwrite)
    model, folder = _load_source(args.ckpt, "fp32")
    counts = expert_counts(model, byte_batches(args.data, model.cfg.vocab_size, args.seq_len, args.batches, args.seed))
    keep = rare_experts(counts, args.remove)
    for layer, c in counts.items():
        gone = sorted(set(range(len(c))) - set(keep[layer]))
        print(f"layer {layer}: removing experts {gone} (tokens {[int(c[e]) for e in gone]})")
    _write_model(prune_experts(model, keep), args, str(folder))
    return 0


def _add_calc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="CONFIG_PRESET_OR_RUN",
                   help="a model config file, a moelab preset, a run, checkpoint or model folder (its config; "
                   "no weights are read), or a published model: "
                   "mixtral-8x7b, qwen3-235b-a22b, deepseek-v3, olmoe-1b-7b, llama-3-70b")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, bf16, fp16, fp8, int8, int4 (default bf16)")
    p.add_argument("--kv-dtype", default="bf16", help="KV-cache dtype (default bf16)")
    p.add_argument("--context", type=int, default=4096, help="tokens in context for attention FLOPs and KV reads")
    p.add_argument("--gpu-bandwidth", type=float, default=3350.0, help="GPU memory bandwidth, GB/s (H100: 3350)")
    p.add_argument("--cpu-bandwidth", type=float, default=100.0, help="CPU memory bandwidth, GB/s")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a field of a moelab config or preset, e.g. --set moe.num_experts=64 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")


def _folder_model_config(folder):
    """The decoder-only model config of a run folder (its newest complete checkpoint), a checkpoint
    folder, a moelab model folder or a Hugging Face folder, read from its config alone: calc needs
    sizes, not weights. An encoder–decoder is refused: calc's estimates are for decoder-only models."""
    import json

    from moelab.checkpoint.folder import is_model_folder, resolve_checkpoint
    from moelab.config import ModelConfig, from_dict, read_config_file
    from moelab.model.encoder_decoder import encoder_decoder_section
    from moelab.objectives import build_objective

    if (folder / "config.json").is_file() and not (folder / "config.yaml").is_file():
        from moelab.convert.hf import config_from_hf
        from moelab.textfile import read_text_file

        text = read_text_file(folder / "config.json", "Hugging Face config", UserError)
        try:
            return config_from_hf(json.loads(text))
        except json.JSONDecodeError as exc:
            raise UserError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    ckpt = folder if is_model_folder(folder) else resolve_checkpoint(folder)
    data = read_config_file(ckpt / "config.yaml")  # a run config (model, data, train) or a model section alone
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    stacks = encoder_decoder_section(data) is not None
    if stacks or build_objective(train.get("objective", "causal")).architecture == "encoder_decoder":
        raise UserError(f"{ckpt} holds an encoder–decoder model: calc estimates decoder-only models")
    return from_dict(ModelConfig, data.get("model", data))


@command("calc", "parameters, FLOPs, memory, KV cache and decode-speed estimates for a model", _add_calc_args)
def _run_calc(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moelab.calc import dtype_bytes, report, resolve

    if args.context < 0:
        raise ConfigError(f"--context={args.context} is invalid: must be >= 0")
    for name, value in (("--gpu-bandwidth", args.gpu_bandwidth), ("--cpu-bandwidth", args.cpu_bandwidth)):
        if not value > 0:
            raise ConfigError(f"{name}={value} is invalid: must be > 0")
    dtype_bytes(args.dtype), dtype_bytes(args.kv_dtype)
    if Path(args.target).is_dir():  # a run, checkpoint or model folder, as eval and generate take
        from moelab.calc import arch_from_config
        from moelab.config import apply_overrides

        cfg = apply_overrides(_folder_model_config(Path(args.target)), args.overrides)
        arch = arch_from_config(cfg, Path(args.target).resolve().name)
    else:
        arch = resolve(args.target, args.overrides)
    data = report(arch, args.dtype, args.context, args.gpu_bandwidth, args.cpu_bandwidth, args.kv_dtype)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from moelab.calc import format_report

    print(format_report(data))
    return 0


def load_checkpoint_for_inference(path: str, device: str, dtype: str | None = None):
    """``(model, tokenizer)`` from a checkpoint, run or model folder, via :func:`moelab.convert.load.load_model`
    (streamed, in ``dtype``; default as stored). An encoder–decoder is refused in one line: these commands decode
    causal models."""
    from moelab.convert.load import load_model
    from moelab.infer.generate import require_causal

    model, tok = load_model(path, device=device, dtype=dtype)
    require_causal(model)
    return model, tok


def _fast_decode_model(model, args: argparse.Namespace):
    """The model ``--fast`` decodes (``generate`` and ``serve``): cast and packed for the fast path in the
    device's decode dtype, a quantized model as it is; refused with ``--offload`` or for a non-causal model."""
    from moelab.infer.fast_decode import cast_for_decode, decode_dtype

    if args.offload:
        raise UserError("--fast and --offload do not combine: the fast path keeps every expert resident")
    if model.cfg.attention != "causal":
        raise UserError(f"--fast needs a causal model; this one has attention={model.cfg.attention!r}")
    if getattr(model, "quant_config", None) is None:
        model = cast_for_decode(model, decode_dtype(args.device))
    return model


def _check_disk_offload_dtype(args: argparse.Namespace) -> None:
    """The disk tier reads experts as stored: refuse a --dtype that differs, before the load."""
    from pathlib import Path

    source = Path(args.checkpoint) / "model.safetensors"
    if not (args.offload and args.dtype and getattr(args, "offload_from", "disk") == "disk" and source.is_file()):
        return
    from moelab.model.materialize import dtype_name, parse_dtype
    from moelab.safetensors_reader import SafetensorsReader

    stored = SafetensorsReader([source]).float_dtype()
    if stored is not None and stored != parse_dtype(args.dtype):
        raise UserError(f"--dtype {args.dtype} with --offload: experts offloaded from disk are read as stored "
                        f"({dtype_name(stored)}); add --offload-from memory, or drop --dtype")  # fmt: skip


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (row i uses seed + i)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the EOS token")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (model.safetensors, config.yaml, tokenizer.json)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: prompts are batched)")
    p.add_argument("--prompt-file", metavar="FILE", help="one prompt per line")
    _add_sampling_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static", help="KV cache kind")
    p.add_argument("--fast", action="store_true",
                   help="decode fast path (moelab.infer.fast_decode): bf16 with prepacked weights where the CPU has "
                        "bf16 units; prints when done (no streaming)")
    p.add_argument("--offload", action="store_true", help="keep routed experts off the device in a bounded cache")
    p.add_argument("--expert-cache", default="25%", metavar="SIZE", help="experts per layer in the cache: '25%%' or a count")
    p.add_argument("--cache-policy", default="lru", help="lru, lfu or pinned (lfu/pinned use a calibration trace)")
    p.add_argument("--prefetch", action="store_true", help="prefetch the next layer's experts with its router")
    p.add_argument("--offload-from", choices=["disk", "memory"], default="disk",
                   help="experts read from the checkpoint file (memory-mapped) or copied to CPU memory")
    p.add_argument("--calibration", metavar="FILE", help="text whose routing counts seed lfu/pinned (default: the prompts)")
    p.add_argument("--draft", metavar="prompt-lookup|CKPT",
                   help="speculative decoding (greedy, one prompt; output unchanged): 'prompt-lookup' drafts by copying "
                        "n-grams from the context, a checkpoint folder drafts with that model (same tokenizer, e.g. "
                        "the dense twin)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="draft tokens verified per pass (default 4)")
    p.add_argument("--json", action="store_true", help="print results (and offload/speculation statistics) as JSON")
    _add_dtype_arg(p)
    _add_allow_large_arg(p)


def _check_draft_args(args: argparse.Namespace, n_prompts: int) -> None:
    """--draft's limits, in one line each, before anything is loaded."""
    if args.draft is None:
        return
    if n_prompts != 1:
        raise UserError(f"--draft decodes one prompt at a time; {n_prompts} were given: pass one --prompt")
    if args.temperature != 0:
        raise UserError(f"--draft is greedy; --temperature {args.temperature} was given: drop it (or --draft)")
    if args.fast:
        raise UserError("--draft and --fast do not combine: speculation verifies drafts with the model's own forward")
    if args.offload:
        raise UserError("--draft and --offload do not combine yet: decode with one of them")
    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens {args.draft_tokens} is invalid: give an integer >= 1")


def _speculative(args: argparse.Namespace, model, tok, prompt: str, ids: list[int], params) -> int:
    """``generate --draft``: one greedy completion through :func:`moelab.infer.speculative.speculative_generate`,
    with the draft's acceptance rate and the tokens each pass of the model yielded."""
    import json

    from moelab.infer.speculative import ModelDraft, PromptLookupDraft, speculative_generate

    if args.draft == "prompt-lookup":
        draft = PromptLookupDraft()
    else:
        draft_model, _ = load_checkpoint_for_inference(args.draft, args.device, args.dtype)
        draft = ModelDraft(draft_model)
    on_text = None if args.json else (lambda row, delta: print(delta, end="", flush=True))
    if on_text is not None:
        print(prompt, end="", flush=True)
    result, stats = speculative_generate(
        model, ids, draft, params, args.draft_tokens, tok, on_text=on_text, cache=args.cache
    )
    if args.json:
        completion = dict(prompt=prompt, text=result.text, finish_reason=result.finish_reason,
                          prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)  # fmt: skip
        print(json.dumps({"completions": [completion], "speculative": stats.as_dict()}, indent=2))
    else:
        print()
        print(f"speculative: {stats.accepted}/{stats.drafted} draft tokens accepted ({stats.acceptance_rate:.0%}), "
              f"{stats.tokens_per_pass:.2f} tokens per pass of the model", file=sys.stderr)  # fmt: skip
    return 0


def sampling_from_args(args: argparse.Namespace, row: int = 0):
    from moelab.infer.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=None if args.seed is None else args.seed + row,
        stop=tuple(args.stop),
        stop_at_eos=not args.ignore_eos,
    )


@command("generate", "generate text from a checkpoint (KV cache, batching, sampling, expert offloading)", _add_generate_args)
def _run_generate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moelab.infer.generate import generate
    from moelab.textfile import read_text_file

    prompts = list(args.prompt)
    if args.prompt_file:
        text = read_text_file(args.prompt_file, "prompt file", UserError, hint="pass a text file with one prompt per line")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise UserError(f"prompt file {args.prompt_file!r} holds no prompt (it is empty or blank): write one prompt per line")
        prompts += lines
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    params = [sampling_from_args(args, i) for i in range(len(prompts))]
    _check_draft_args(args, len(prompts))
    # offloading: load on the CPU, take the experts out, then move the rest to the device
    _check_disk_offload_dtype(args)
    model, tok = load_checkpoint_for_inference(args.checkpoint, "cpu" if args.offload else args.device, args.dtype)
    ids = [tok.encode(p) or [tok.bos_id] for p in prompts]
    offloader = None
    if args.offload:
        from moelab.infer.offload import Offloader, text_routing_counts

        counts = None
        if args.cache_policy in ("lfu", "pinned"):
            text = read_text_file(args.calibration, "calibration file", UserError) if args.calibration else "\n".join(prompts)
            counts = text_routing_counts(model, tok, text)
        source = Path(args.checkpoint) / "model.safetensors"
        offloader = Offloader(
            model, args.expert_cache, args.cache_policy, prefetch=args.prefetch,
            source=source if args.offload_from == "disk" and source.is_file() else None, device=args.device, counts=counts,
        )
        model.to(args.device)
    if args.draft is not None:
        return _speculative(args, model, tok, prompts[0], ids[0], params[0])
    decoder = None  # generate's default: the model's own forward with a KV cache
    if args.fast:
        from moelab.infer.fast_decode import FastDecoder

        model = _fast_decode_model(model, args)
        decoder = FastDecoder
    stream = len(prompts) == 1 and not args.json
    on_text = (lambda row, delta: print(delta, end="", flush=True)) if stream else None
    if stream:
        print(prompts[0], end="", flush=True)
    results = generate(model, ids, params, tok, on_text=on_text, cache=args.cache, decoder=decoder)
    if args.json:
        data = {"completions": [dict(prompt=p, text=r.text, finish_reason=r.finish_reason,
                                     prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
                                for p, r in zip(prompts, results)]}
        if offloader is not None:
            data["offload"] = offloader.stats.as_dict()
        print(json.dumps(data, indent=2))
        return 0
    if stream:
        print()
    else:
        for p, r in zip(prompts, results):
            print(f"--- {p!r} ({r.finish_reason})\n{p}{r.text}")
    if offloader is not None:
        s = offloader.stats
        print(f"offload: hit rate {s.hit_rate:.1%} ({s.hits}/{s.lookups}), {s.misses} misses, "
              f"{s.bytes_moved / 1e6:.1f} MB fetched on demand, {s.prefetch_loads} prefetches "
              f"({s.prefetch_bytes / 1e6:.1f} MB, {s.prefetch_hits} used), {s.stalls} stalls", file=sys.stderr)
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    # defaults live in moelab.infer.server.ServerLimits (not imported here: parsing stays torch-free)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (model.safetensors, config.yaml, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the folder name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (else 401); default: $MOELAB_API_KEY, or no key")
    p.add_argument("--max-body-bytes", type=int, default=None, help="(default 1000000) larger request bodies get 413")
    p.add_argument("--max-json-depth", type=int, default=None,
                   help="(default 32) deeper nesting of JSON arrays/objects gets 400, before parsing")
    p.add_argument("--body-timeout", type=float, default=None,
                   help="(default 10) seconds to receive a whole request body before 408 and a closed connection")
    p.add_argument("--max-pending", type=int, default=None, help="(default 64) requests in flight before 429")
    p.add_argument("--max-batch", type=int, default=None, help="(default 8) requests batched into one generate call")
    p.add_argument("--batch-wait", type=float, default=None, help="(default 0.005) seconds the worker waits to fill a batch")
    p.add_argument("--timeout", type=float, default=None, help="(default 120) seconds per request before 504")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="(default 256) tokens generated when a request gives no max_tokens")
    p.add_argument("--offload", action="store_true", help="keep routed experts off the device in a bounded cache")
    p.add_argument("--fast", action="store_true",
                   help="decode through the fast path (moelab.infer.fast_decode: packed weights in the detected dtype, "
                        "native fused blocks at batch 1); not with --offload")
    p.add_argument("--expert-cache", default="25%", metavar="SIZE", help="experts per layer in the cache: '25%%' or a count")
    p.add_argument("--cache-policy", default="lru", help="lru or lfu (lfu without a trace counts uses online)")
    p.add_argument("--prefetch", action="store_true", help="prefetch the next layer's experts with its router")
    _add_dtype_arg(p)


@command("serve", "serve a checkpoint over an OpenAI-compatible HTTP API (needs the serve extra)", _add_serve_args)
def _run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError('moelab serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    import os

    from moelab.infer.chat import load_chat_template
    from moelab.infer.server import Engine, ServerLimits, create_app, serve_forever
    from moelab.infer.server_auth import check_api_key

    given = dict(
        max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth, body_timeout_s=args.body_timeout,
        max_pending=args.max_pending, max_batch=args.max_batch,
        batch_wait_s=args.batch_wait, timeout_s=args.timeout, default_max_tokens=args.default_max_tokens,
    )
    limits = ServerLimits(**{k: v for k, v in given.items() if v is not None})
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port={args.port} is invalid: must be in [0, 65535]")
    api_key = args.api_key if args.api_key is not None else os.environ.get("MOELAB_API_KEY") or None
    if api_key is not None:
        check_api_key(api_key)  # before the model loads
    _check_disk_offload_dtype(args)
    model, tok = load_checkpoint_for_inference(args.checkpoint, "cpu" if args.offload else args.device, args.dtype)
    if args.offload:
        from moelab.infer.offload import Offloader

        source = Path(args.checkpoint) / "model.safetensors"
        Offloader(model, args.expert_cache, args.cache_policy, prefetch=args.prefetch,
                  source=source if source.is_file() else None, device=args.device)
        model.to(args.device)
    generate_fn = None
    if args.fast:
        from functools import partial

        from moelab.infer.fast_decode import FastDecoder
        from moelab.infer.generate import generate

        model = _fast_decode_model(model, args)
        generate_fn = partial(generate, decoder=FastDecoder)  # the same loop, the fast backend
    engine = Engine(model, tok, limits) if generate_fn is None else Engine(model, tok, limits, generate_fn)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, model_name=name, chat_template=load_chat_template(args.checkpoint), api_key=api_key)
    serve_forever(app, args.host, args.port)
    return 0


# ----------------------------------------------------------------------------- train, eval, compare


def add_run_config_args(p: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="run config (model/data/train sections), YAML or JSON")
    src.add_argument("--preset", metavar="NAME", help=f"named run: smoke, tiny, small (default {default_preset})")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a field: train.steps=200, data.corpus=PATH, model.d_model=256 (moe.* means model.moe.*)",
    )
    p.add_argument(
        "--objective",
        metavar="NAME",
        help="training objective: causal (default), prefix, mlm, span (= --set train.objective=NAME; docs/objectives.md)",
    )
    _add_allow_large_arg(p)


def run_config_from_args(args: argparse.Namespace, default_preset: str = "tiny"):
    """The run config of ``--config``/``--preset``/``--set``, refused (one line) when training it
    cannot fit in free memory: checked here, before any data is prepared."""
    from dataclasses import replace

    from moelab.config import apply_overrides, load_run_config, normalize_run_overrides, run_preset
    from moelab.model.memory_guard import require_training_fits
    from moelab.moe.validate import check_model_config
    from moelab.objectives import build_objective
    from moelab.train.master_weights import MASTER_PRECISION, MASTER_WEIGHT_BYTES

    cfg = load_run_config(args.config) if args.config else run_preset(args.preset or default_preset)
    overrides = list(args.overrides)
    if getattr(args, "objective", None):
        overrides.append(f"train.objective={args.objective}")
    cfg = apply_overrides(cfg, normalize_run_overrides(overrides))
    cfg = replace(cfg, model=check_model_config(cfg.model))  # a bad router name or option: one line, before data
    # The vocabulary comes from the tokenizer when the run starts; count at most the 256 bytes every
    # moelab tokenizer has, so the estimate stays a lower bound.
    model = replace(cfg.model, vocab_size=min(cfg.model.vocab_size, 256))
    if build_objective(cfg.train.objective).architecture == "encoder_decoder":
        from moelab.model.encoder_decoder import EncoderDecoderConfig

        model = EncoderDecoderConfig.from_model(model)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    weight_bytes = MASTER_WEIGHT_BYTES if cfg.train.precision == MASTER_PRECISION else 4
    require_training_fits(
        model, tokens, 4 if cfg.train.precision == "fp32" else 2, cfg.train.device, weight_bytes=weight_bytes
    )
    return cfg


@contextlib.contextmanager
def _warnings_as_lines():
    """Corpus skips and damaged checkpoints are warnings a user should read as one line each."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"moelab: warning: {message}", file=sys.stderr)

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_run_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a run folder that holds an earlier run (deletes its checkpoints and metrics.jsonl; "
                        "refused when it holds files moelab did not write)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue with train settings (steps, lr, ...) that differ from the checkpoint's; "
                        "model and data settings can never change")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="stop (with a checkpoint) at this step; resume later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--init",
        metavar="PATH",
        help="start from these weights: moelab/HF model folder, checkpoint or run folder (its model config is the run's)",
    )
    p.add_argument("--ep", type=int, default=1, metavar="N", help="under torchrun: expert-parallel ranks (divides world size and moe.num_experts)")
    p.add_argument("--dp", default="manual", metavar="MODE", help="under torchrun: data-parallel mode (manual or ddp; see docs/distributed.md)")


@command("train", "train a model on a corpus: metrics.jsonl and checkpoints in a run folder", _add_train_args)
def _run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from moelab.parallel.env import launched_by_torchrun

    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change applies to --resume only: a fresh run takes its config as given")
    init = None
    if args.init:  # the model comes from --init; --config/--preset/--set give data and train
        from moelab.experiment.init_source import load_init_source
        from moelab.train.init import init_run_config, require_init_training_fits

        init = load_init_source(args.init)
        cfg = init_run_config(init, args.config, args.preset, args.overrides)
        require_init_training_fits(init, cfg)
    else:
        cfg = run_config_from_args(args)
    if args.no_progress:
        cfg = replace(cfg, train=replace(cfg.train, progress=False))
    out = args.out or f"runs/{cfg.name}"
    if launched_by_torchrun() or args.ep > 1:
        from moelab.experiment.distributed import train_distributed

        with _warnings_as_lines():
            train_distributed(cfg, out, args.ep, args.dp, args.resume, args.stop_after, init,
                              overwrite=args.overwrite, allow_config_change=args.allow_config_change)
        return 0
    from moelab.experiment.run import train_run

    with _warnings_as_lines():
        run = train_run(cfg, out, init=init, resume=args.resume, stop_at=args.stop_after, overwrite=args.overwrite,
                        allow_config_change=args.allow_config_change)
    if run.trainer.config_changes:
        print(f"resumed with a changed config: {', '.join(map(str, run.trainer.config_changes))}")
    result = run.result
    extra = "".join(f", {k} {v:.4f}" for k, v in result.metrics.items() if k not in ("loss", "tokens"))
    print(f"step {run.steps}: val loss {result.loss:.4f} (ppl {result.ppl:.2f}{extra}); checkpoints in {out}/checkpoints")
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or run folder (newest complete checkpoint)")
    p.add_argument("--data", metavar="CORPUS",
                   help="evaluate every document of this corpus (default: the run's validation split)")
    p.add_argument("--max-bytes-per-domain", type=int, default=None, metavar="N",
                   help="with --data: keep about N characters per domain, as training does (default: no cap)")
    p.add_argument("--batches", type=int, default=None, metavar="N", help="at most N batches (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--objective", metavar="NAME",
                   help="evaluate with this objective (default: the one the checkpoint was trained with)")
    _add_dtype_arg(p)
    tasks = p.add_argument_group("downstream tasks (lm-evaluation-harness)")
    tasks.add_argument("--tasks", metavar="A,B",
                       help="run these harness tasks instead of the loss (e.g. hellaswag,arc_easy, or tasks of --include-path)")
    tasks.add_argument("--include-path", metavar="DIR", help="a folder of task YAML files (local tasks over local data)")
    tasks.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: the task's)")
    tasks.add_argument("--limit", type=float, metavar="N", help="at most N documents per task (a fraction if < 1)")
    tasks.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows scored together (default 8)")


@command("eval", "loss, perplexity and bits per byte of a checkpoint, overall and per domain/language; "
                 "or downstream tasks with --tasks", _add_eval_args)  # fmt: skip
def _run_eval(args: argparse.Namespace) -> int:
    import json

    from moelab.experiment.evaluate import evaluate_checkpoint, format_result

    if args.tasks is not None:
        from moelab.experiment.harness import evaluate_tasks, format_task_results

        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        with _warnings_as_lines():
            result = evaluate_tasks(args.checkpoint, [t.strip() for t in args.tasks.split(",") if t.strip()],
                                    include_path=args.include_path, num_fewshot=args.num_fewshot, limit=limit,
                                    batch_size=args.batch_size, dtype=args.dtype)  # fmt: skip
        print(json.dumps(result, indent=1) if args.json else format_task_results(result))
        return 0
    with _warnings_as_lines():
        result = evaluate_checkpoint(args.checkpoint, data=args.data, batches=args.batches, objective=args.objective,
                                     max_bytes_per_domain=args.max_bytes_per_domain, dtype=args.dtype)
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    add_run_config_args(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/compare-<name>)")
    p.add_argument("--iso-total", action="store_true", help="also train the iso-total dense twin (same total parameters)")
    p.add_argument("--no-analysis", action="store_true", help="skip the routing analysis of the MoE (analysis/ + report sections)")
    p.add_argument("--seeds", type=int, default=3, metavar="N",
                   help="seeds 0..N-1: every model trains once per seed; the verdict is the paired difference (default 3)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs trained side by side, each on threads/N torch threads (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("compare", "train an MoE and its dense twins on the same data; write report.html and summary.json", _add_compare_args)
def _run_compare(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import replace

    from moelab.experiment.compare import run_compare
    from moelab.report.compare import print_table

    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    cfg = run_config_from_args(args)
    if args.no_progress:
        cfg = replace(cfg, train=replace(cfg.train, progress=False))
    out = args.out or f"runs/compare-{cfg.name}"
    argv = [a for a in sys.argv[1:] if a != "--no-progress"] if sys.argv[0].endswith(("moelab", "__main__.py")) else []
    command_line = "moelab " + " ".join(shlex.quote(a) for a in argv) if argv else "moelab compare"
    with _warnings_as_lines():
        summary = run_compare(cfg, out, iso_total=args.iso_total, seeds=args.seeds, jobs=args.jobs, command=command_line,
                              analysis=not args.no_analysis)  # fmt: skip
    print_table(summary)
    print(f"report: {out}/report.html  summary: {out}/summary.json")
    return 0


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT",
                   help="checkpoint folder, run folder (its newest complete checkpoint), or model folder (moelab convert, HF)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8: per output channel; 4: group-wise")
    p.add_argument("--group", type=int, default=32, help="int4 group size: 32, 64, 128 or 256 (default 32)")
    p.add_argument("--only", choices=["experts", "all"], default="experts", help="experts only, or every linear")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the quantized checkpoint to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only a checkpoint; never the source or a folder holding it)")
    _add_dtype_arg(p)


@command("quantize", "write a weight-only int8/int4 copy of a checkpoint (loads wherever checkpoints load)", _add_quantize_args)
def _run_quantize(args: argparse.Namespace) -> int:
    from moelab.experiment.quantize import quantize_checkpoint

    report = quantize_checkpoint(args.ckpt, args.out, bits=args.bits, group_size=args.group, only=args.only,
                                 overwrite=args.overwrite, dtype=args.dtype)
    print(report.summary())
    return 0


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="T=512, fwd+bwd only, tiny preset: under 2 minutes")
    p.add_argument("--dtype", dest="dtypes", action="append", choices=["fp32", "bf16"], help="repeatable; default both")
    p.add_argument("--tokens", type=int, help="tokens per layer call (default 512 quick, 4096 full)")
    p.add_argument("--repeats", type=int, help="timed rounds per candidate (default 2 quick, 5 full)")
    p.add_argument("--d-model", type=int, default=512, help="model dim of the layer benchmarks (default 512)")
    p.add_argument("--backend", dest="backends", action="append", metavar="NAME", help="dispatch backends (repeatable; default all)")
    p.add_argument("--skew", action="store_true", help="also run a biased router: time and drop rate as balance worsens")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' Mixtral block")
    p.add_argument("--hf-impl", dest="hf_impls", action="append", choices=["eager", "grouped_mm"],
                   help="transformers experts implementations to run (repeatable; default both)")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep over E (full runs)")
    p.add_argument("--no-model", action="store_true", help="skip the full-model training step")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results", metavar="DIR",
                   help="where JSON and markdown go (never replaced: a rerun in one minute gets STEM-2.*)")


@command("bench", "benchmark MoE dispatch backends against the dense twin and transformers' Mixtral", _add_bench_args)
def _run_bench(args: argparse.Namespace) -> int:
    import datetime as _dt
    from pathlib import Path

    import torch

    from moelab.benchmarks.report import check_results_folder, to_markdown, write_report
    from moelab.benchmarks.runner import BenchOptions, run_bench
    from moelab.hardware import cpu_has_bf16
    from moelab.moe.dispatch import DISPATCHERS

    check_results_folder(args.out)  # results get fresh names (write_report): only a file is refused
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; run on a GPU machine or use --device cpu")
    for name in args.backends or []:
        DISPATCHERS[name]  # unknown name → ConfigError listing the registered ones
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        print(f"CPU bf16 matrix units (avx512_bf16/amx_bf16): {'yes' if cpu_has_bf16() else 'no'}")
    opts = BenchOptions(
        quick=args.quick,
        dtypes=tuple(dict.fromkeys(args.dtypes or ["fp32", "bf16"])),
        tokens=args.tokens,
        d_model=args.d_model,
        repeats=args.repeats,
        backends=tuple(args.backends or DISPATCHERS),
        hf=not args.no_hf,
        hf_impls=tuple(args.hf_impls or ("eager", "grouped_mm")),
        sweep=False if args.no_sweep else None,
        model=not args.no_model,
        skew=args.skew,
        device=args.device,
    )
    result = run_bench(opts, log=lambda msg: print(msg, flush=True))
    command_line = "moelab bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "moelab bench"
    stem = ("quick-" if args.quick else "bench-") + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    json_path, md_path = write_report(result, Path(args.out), stem, command_line)
    print(to_markdown(result, command_line))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _add_bench_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", metavar="DIR", help="trained checkpoint (default: the Mixtral-shaped config, random weights)")
    p.add_argument("--quick", action="store_true", help="smoke run: 32-token prompt, 16 decoded, bf16 and int8 only")
    p.add_argument("--dtype", dest="dtypes", action="append", choices=["fp32", "bf16", "int8", "int4"],
                   help="repeatable (default all four; --quick: bf16, int8)")
    p.add_argument("--batch", dest="batches", type=int, action="append", help="repeatable (default 1 and 8)")
    p.add_argument("--prompt", type=int, help="prompt tokens per row (default 128; --quick 32)")
    p.add_argument("--new", type=int, help="decoded tokens per row (default 64; --quick 16)")
    p.add_argument("--group", type=int, default=32, help="int4 group size (default 32)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--peer", choices=["llama.cpp"],
                   help="also time llama.cpp on the same weights (GGUF bf16/q8_0/q4_0/f32); needs pip install -e \".[peer]\"")
    p.add_argument("--threads", type=int, help="torch threads, and llama.cpp's with --peer (default: torch's choice)")
    p.add_argument("--rounds", type=int, help="timed rounds per candidate, interleaved; rows are medians (default 3; --quick 1)")
    p.add_argument("--out", default="benchmarks/results", metavar="DIR",
                   help="where decode.json and decode.md go (--quick: decode-quick.json/.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier decode.json/.md in --out (only files bench-decode wrote)")


@command("bench-decode", "decode/prefill tok/s of the fast path (MoE, dense twin, fp32/bf16/int8/int4) vs transformers "
         "and llama.cpp",
         _add_bench_decode_args)
def _run_bench_decode(args: argparse.Namespace) -> int:
    import torch

    from moelab.bench_decode import check_results, mixtral_shaped, run_decode_bench, write_results
    from moelab.model.transformer import Transformer
    from moelab.model.twins import dense_twin

    if args.threads:
        torch.set_num_threads(args.threads)
    quick_dtypes = ["bf16", "int8"] if args.quick else ["fp32", "bf16", "int8", "int4"]
    dtypes = tuple(dict.fromkeys(args.dtypes or quick_dtypes))
    prompt = args.prompt or (32 if args.quick else 128)
    new = args.new or (16 if args.quick else 64)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        raise UserError(f"--rounds {rounds}: needs at least 1 round")
    stem = "decode-quick" if args.quick else "decode"
    check_results(args.out, stem, args.overwrite)  # an earlier result is refused now, not after the timing
    peer = args.peer
    if peer == "llama.cpp":
        from moelab.infer.llama_cpp_peer import INSTALL, llama_cpp_version

        if llama_cpp_version() is None:
            print(f"notice: llama-cpp-python is not installed ({INSTALL}): the llama.cpp rows are skipped")
            peer = None

    def check_length(cfg) -> None:
        if prompt < 1 or new < 1 or prompt + new + 1 > cfg.max_seq_len:
            raise UserError(
                f"--prompt {prompt} and --new {new}: both must be >= 1 and prompt + new + 1 <= the model's "
                f"max_seq_len={cfg.max_seq_len}"
            )

    if args.ckpt:
        moe, _ = load_checkpoint_for_inference(args.ckpt, "cpu")
        if moe.cfg.moe is None:
            raise UserError(f"--ckpt {args.ckpt}: the checkpoint is dense; bench-decode compares an MoE with its twin")
        check_length(moe.cfg)
        moe = moe.float()
    else:
        check_length(mixtral_shaped())
        torch.manual_seed(0)
        moe = Transformer(mixtral_shaped()).eval()
    torch.manual_seed(1)
    dense = Transformer(dense_twin(moe.cfg, "iso_active")).eval()  # random weights: speed only
    res = run_decode_bench(
        moe, dense, dtypes=dtypes, batches=tuple(args.batches or (1, 8)), prompt=prompt, new=new, group=args.group,
        hf_dtypes=() if args.no_hf else tuple(d for d in dtypes if d in ("fp32", "bf16")) or ("bf16",),
        rounds=rounds, peer=peer,
    )  # fmt: skip
    js, md = write_results(res, args.out, stem=stem, overwrite=args.overwrite)
    print(res.to_markdown())
    print(f"wrote {js} and {md}")
    return 0


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="study name (see --list)")
    p.add_argument("--list", action="store_true", help="list every study (issue 11's twelve and issue 14's), one line each")
    p.add_argument("--budget", choices=["smoke", "full", "gpu"], default="smoke",
                   help="smoke: sanity only; full: the committed results (CPU); gpu: 20x the tokens of full, on CUDA")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--out", default="runs/studies", metavar="DIR", help="where the runs go (OUT/NAME)")
    p.add_argument("--overwrite", action="store_true",
                   help="run again into a non-empty OUT/NAME: deletes the study's earlier run there (only)")
    p.add_argument("--docs", default="docs/studies", metavar="DIR", help="where NAME.md, NAME.json and README.md go")
    p.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="train N runs side by side, each on threads/N torch threads (tiny models: faster than threads)",
    )  # fmt: skip
    p.add_argument(
        "--rescore", action="store_true",
        help="re-score the committed DOCS/NAME.json with the study's declared rule and rewrite its page (no training)",
    )  # fmt: skip


@command("study", "reproduce a claim about MoE: train arms over seeds, write docs/studies/NAME.md + .json", _add_study_args)
def _run_study(args: argparse.Namespace) -> int:
    from moelab.errors import UserError
    from moelab.studies import CATALOG, STUDIES, rescore_study, run_study

    if args.list:
        width = max(map(len, CATALOG))
        for name, line in CATALOG.items():
            mark = "" if name in STUDIES else " [not implemented]"
            print(f"{name:{width}s}  {line}{mark}")
        return 0
    if not args.name:
        raise UserError("moelab study needs a NAME or --list")
    if args.rescore:
        if args.overwrite:
            raise UserError("--overwrite replaces a study's runs; --rescore trains nothing: drop one of them")
        res = rescore_study(args.name, docs=args.docs)
        before = res.rescored["previous_verdict"] if res.rescored else "?"
        print(f"{res.name}: {before} -> {res.verdict}: {res.verdict_reason}; rewrote {args.docs}/{res.name}.md")
        return 0
    cmd = f"moelab study {args.name} --budget {args.budget} --seeds {args.seeds}" + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    res = run_study(args.name, args.budget, args.seeds, out=args.out, docs=args.docs, command=cmd,
                    jobs=args.jobs, overwrite=args.overwrite)
    print(f"{res.name}: {res.verdict}: {res.verdict_reason}; wrote {args.docs}/{res.name}.md")
    return 0


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    from moelab import __version__

    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Build, train, analyse, convert and serve Mixture-of-Experts models next to their dense twins.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        _check_seed(args)
        with _allow_large_env(getattr(args, "allow_large", False)):
            return COMMANDS[args.command].run(args) or 0
    except (ConfigError, UserError) as exc:
        if args.debug:
            raise
        print(f"moelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moelab routers | head`: the reader left; stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would raise again
        return 141


if __name__ == "__main__":
    sys.exit(main())
