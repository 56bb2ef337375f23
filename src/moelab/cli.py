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
    p.add_argument("--out", default="benchmarks/results", metavar="DIR", help="where JSON and markdown go")


@command("bench", "benchmark MoE dispatch backends against the dense twin and transformers' Mixtral", _add_bench_args)
def _run_bench(args: argparse.Namespace) -> int:
    import datetime as _dt
    from pathlib import Path

    import torch

    from moelab.benchmarks.report import to_markdown, write_report
    from moelab.benchmarks.runner import BenchOptions, run_bench
    from moelab.hardware import cpu_has_bf16
    from moelab.moe.dispatch import DISPATCHERS

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
