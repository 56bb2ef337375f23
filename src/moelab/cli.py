"""`moelab <command>`: the only place that parses arguments.

Each command is a pair of functions registered in ``COMMANDS``: one adds its arguments to a
subparser, one runs it with the parsed namespace. Errors a user can act on (``ConfigError``,
``UserError``) print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
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


@command("routers", "list the registered routers (one line each), dispatch backends, balance losses and drop policies")
def _run_routers(args: argparse.Namespace) -> int:
    from moelab.moe.capacity import DROP_POLICIES
    from moelab.moe.dispatch import DISPATCHERS
    from moelab.moe.losses import BALANCE_LOSSES
    from moelab.moe.routers import ROUTERS

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
    print(f"balance losses (moe.aux_loss): {', '.join(BALANCE_LOSSES)}; also z_loss")
    print(f"drop policies (moe.drop_policy): {', '.join(DROP_POLICIES)}")
    print(f"dispatch backends (moe.dispatch): {', '.join(DISPATCHERS)}")
    return 0


def _add_analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="CKPT_OR_RUN", help="checkpoint folder, or run folder (its newest checkpoint)")
    p.add_argument("--data", required=True, metavar="NAME_OR_PATH", help="labelled corpus: synthetic, builtin, a path, hf:NAME")
    p.add_argument("--out", default="analysis", metavar="DIR", help="where analysis.json, report.html and traces go")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="CKPT", help="run folder or checkpoints for routing drift")
    p.add_argument("--dense", metavar="CKPT", help="dense twin checkpoint: gradient conflict and FFN sparsity")
    p.add_argument("--max-tokens", type=int, default=65_536, help="tokens traced (default 65536)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="capacity imposed for the drops analysis")
    p.add_argument("--drop-tokens", type=int, default=16_384, help="tokens for the drops analysis")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the checkpoint's data.seq_len)")
    p.add_argument("--max-bytes-per-domain", type=int, default=2_000_000, help="corpus cap per domain label")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("analyze", "routing analysis of a checkpoint on a labelled corpus: report.html + analysis.json", _add_analyze_args)
def _run_analyze(args: argparse.Namespace) -> int:
    from moelab.analysis.analyze import AnalyzeOptions, analyze

    for name in ("max_tokens", "batch_size", "drop_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.capacity_factor <= 0:
        raise UserError(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    opts = AnalyzeOptions(
        data=args.data, out=args.out, checkpoints=tuple(args.checkpoints), dense=args.dense,
        max_tokens=args.max_tokens, batch_size=args.batch_size, capacity_factor=args.capacity_factor,
        drop_tokens=args.drop_tokens, seq_len=args.seq_len, max_bytes_per_domain=args.max_bytes_per_domain,
        progress=not args.no_progress,
    )
    analyze(args.model, opts)
    print(f"wrote {opts.out}/report.html and {opts.out}/analysis.json")
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
