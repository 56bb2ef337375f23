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


def _add_calc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="CONFIG_OR_PRESET",
                   help="a model config file, a moelab preset, or a published model: "
                   "mixtral-8x7b, qwen3-235b-a22b, deepseek-v3, olmoe-1b-7b, llama-3-70b")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, bf16, fp16, fp8, int8, int4 (default bf16)")
    p.add_argument("--kv-dtype", default="bf16", help="KV-cache dtype (default bf16)")
    p.add_argument("--context", type=int, default=4096, help="tokens in context for attention FLOPs and KV reads")
    p.add_argument("--gpu-bandwidth", type=float, default=3350.0, help="GPU memory bandwidth, GB/s (H100: 3350)")
    p.add_argument("--cpu-bandwidth", type=float, default=100.0, help="CPU memory bandwidth, GB/s")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")


@command("calc", "parameters, FLOPs, memory, KV cache and decode-speed estimates for a model", _add_calc_args)
def _run_calc(args: argparse.Namespace) -> int:
    import json

    from moelab.calc import dtype_bytes, report, resolve

    if args.context < 0:
        raise ConfigError(f"--context={args.context} is invalid: must be >= 0")
    for name, value in (("--gpu-bandwidth", args.gpu_bandwidth), ("--cpu-bandwidth", args.cpu_bandwidth)):
        if not value > 0:
            raise ConfigError(f"{name}={value} is invalid: must be > 0")
    dtype_bytes(args.dtype), dtype_bytes(args.kv_dtype)
    data = report(resolve(args.target), args.dtype, args.context, args.gpu_bandwidth, args.cpu_bandwidth, args.kv_dtype)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from moelab.calc import format_report

    print(format_report(data))
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
