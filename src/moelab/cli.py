"""`moelab <command>`: the only place that parses arguments.

Each command is a pair of functions registered in ``COMMANDS``: one adds its arguments to a
subparser, one runs it with the parsed namespace. Errors a user can act on (``ConfigError``,
``UserError``) print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

    cfg = load_config(args.config) if args.config else preset(args.preset or default_preset)
    return apply_overrides(cfg, args.overrides)


# ----------------------------------------------------------------------------- commands


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_model_config_args(p)
    p.add_argument("--twin", choices=["iso_active", "iso_total", "iso_flop"], help="print the dense twin instead")
    p.add_argument("--out", metavar="FILE", help="also write the resolved config to FILE (.yaml or .json)")


@command("config", "print a resolved model config and its parameter counts", _add_config_args)
def _run_config(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console

    from moelab.config import save_config, to_dict
    from moelab.model.transformer import Transformer
    from moelab.model.twins import count_params, dense_twin

    cfg = model_config_from_args(args)
    if args.twin:
        cfg = dense_twin(cfg, args.twin)
    console = Console()
    console.print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    counts = count_params(Transformer(cfg))
    console.print(
        f"[bold]parameters[/]: total {counts.total:,}  active/token {counts.active:,}  "
        f"embedding {counts.embedding:,}  router {counts.router:,}"
    )
    if args.out:
        save_config(cfg, args.out)
    return 0


@command("routers", "list the registered routers, dispatch backends, balance losses and drop policies")
def _run_routers(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moelab.moe.capacity import DROP_POLICIES
    from moelab.moe.dispatch import DISPATCHERS
    from moelab.moe.losses import BALANCE_LOSSES
    from moelab.moe.routers import ROUTERS

    table = Table(title="routers")
    for col in ("name", "learned", "causal-safe", "paper", "summary"):
        table.add_column(col)
    for name, cls in ROUTERS.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add_row(name, str(cls.learned), str(cls.causal_safe), cls.paper, summary)
    console = Console()
    console.print(table)
    console.print(f"dispatch backends: {', '.join(DISPATCHERS)}")
    console.print(f"balance losses: {', '.join(BALANCE_LOSSES)}")
    console.print(f"drop policies: {', '.join(DROP_POLICIES)}")
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


def run_config_from_args(args: argparse.Namespace, default_preset: str = "tiny"):
    from moelab.config import apply_overrides, load_run_config, normalize_run_overrides, run_preset

    cfg = load_run_config(args.config) if args.config else run_preset(args.preset or default_preset)
    return apply_overrides(cfg, normalize_run_overrides(args.overrides))


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
    p.add_argument("--stop-after", type=int, metavar="STEP", help="stop (with a checkpoint) at this step; resume later")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("train", "train a model on a corpus: metrics.jsonl and checkpoints in a run folder", _add_train_args)
def _run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from moelab.data.prepare import prepare_data
    from moelab.data.tokenizer import load_tokenizer
    from moelab.train.checkpoint import latest_checkpoint
    from moelab.train.trainer import Trainer

    cfg = run_config_from_args(args)
    if args.no_progress:
        cfg = replace(cfg, train=replace(cfg.train, progress=False))
    out = args.out or f"runs/{cfg.name}"
    with _warnings_as_lines():
        # Resuming reuses the checkpoint's tokenizer instead of training a new one.
        ckpt = latest_checkpoint(out) if args.resume else None
        tokenizer = load_tokenizer(ckpt / "tokenizer.json") if ckpt is not None else None
        cfg, data = prepare_data(cfg, tokenizer=tokenizer)
        trainer = Trainer(cfg, out, data=data)
        result = trainer.train(resume=args.resume, stop_at=args.stop_after)
    print(f"step {trainer.step}: val loss {result.loss:.4f} (ppl {result.ppl:.2f}); checkpoints in {out}/checkpoints")
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder or run folder (newest complete checkpoint)")
    p.add_argument("--data", metavar="CORPUS", help="evaluate on all of this corpus (default: the run's validation split)")
    p.add_argument("--batches", type=int, default=None, metavar="N", help="at most N batches (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


@command("eval", "validation loss and perplexity of a checkpoint, overall and per domain/language", _add_eval_args)
def _run_eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    import torch

    from moelab.data.corpus import load_corpus
    from moelab.data.loader import build_splits, eval_batches, pack
    from moelab.errors import UserError
    from moelab.train.checkpoint import load_model, read_run_config, resolve_checkpoint
    from moelab.train.trainer import evaluate, resolve_precision

    with _warnings_as_lines():
        ckpt = resolve_checkpoint(args.checkpoint)
    cfg = read_run_config(ckpt)
    model, tok = load_model(ckpt)
    if args.data:
        with _warnings_as_lines():
            docs = load_corpus(replace(cfg.data, corpus=args.data))
        data = pack(docs, tok, cfg.data.seq_len)
        if data.num_blocks == 0:
            raise UserError(f"corpus {args.data!r} has fewer than data.seq_len+1={cfg.data.seq_len + 1} tokens")
    else:
        docs = load_corpus(cfg.data)
        data = build_splits(docs, tok, cfg.data.seq_len, cfg.data.val_fraction, cfg.data.seed).val
    bf16 = resolve_precision(cfg.train.precision, torch.device("cpu"))
    r = evaluate(model, eval_batches(data, cfg.train.batch_size, args.batches), data.label_names, bf16)
    result = {"checkpoint": str(ckpt), "loss": r.loss, "ppl": r.ppl, "tokens": r.tokens, "loss_by": r.loss_by}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{ckpt}: loss {r.loss:.4f}  ppl {r.ppl:.2f}  ({r.tokens:,} tokens)")
    for name, per in r.loss_by.items():
        if name in ("domain", "lang"):
            print(f"  by {name}: " + "  ".join(f"{k} {v:.3f}" for k, v in per.items()))
    return 0


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    add_run_config_args(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/compare-<name>)")
    p.add_argument("--iso-total", action="store_true", help="also train the iso-total dense twin (same total parameters)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("compare", "train an MoE and its dense twins on the same data; write report.html and summary.json", _add_compare_args)
def _run_compare(args: argparse.Namespace) -> int:
    import shlex
    from dataclasses import replace

    from moelab.compare import run_compare
    from moelab.report.compare import print_table

    cfg = run_config_from_args(args)
    if args.no_progress:
        cfg = replace(cfg, train=replace(cfg.train, progress=False))
    out = args.out or f"runs/compare-{cfg.name}"
    argv = [a for a in sys.argv[1:] if a != "--no-progress"] if sys.argv[0].endswith(("moelab", "__main__.py")) else []
    command_line = "moelab " + " ".join(shlex.quote(a) for a in argv) if argv else "moelab compare"
    with _warnings_as_lines():
        summary = run_compare(cfg, out, iso_total=args.iso_total, command=command_line)
    print_table(summary)
    print(f"report: {out}/report.html  summary: {out}/summary.json")
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
        return COMMANDS[args.command].run(args) or 0
    except (ConfigError, UserError) as exc:
        if args.debug:
            raise
        print(f"moelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moelab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
