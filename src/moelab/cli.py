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


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder, or a run folder (its newest complete checkpoint)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="8: per output channel; 4: group-wise")
    p.add_argument("--group", type=int, default=32, help="int4 group size: 32, 64, 128 or 256 (default 32)")
    p.add_argument("--only", choices=["experts", "all"], default="experts", help="experts only, or every linear")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the quantized checkpoint to")


@command("quantize", "write a weight-only int8/int4 copy of a checkpoint (loads wherever checkpoints load)", _add_quantize_args)
def _run_quantize(args: argparse.Namespace) -> int:
    from moelab.quant.convert import quantize_checkpoint

    report = quantize_checkpoint(args.ckpt, args.out, bits=args.bits, group_size=args.group, only=args.only)
    print(report.summary())
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
