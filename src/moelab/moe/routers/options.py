"""Router options: each router declares its own (``Options``, a frozen dataclass), with defaults and checks.

Why here and not in the config: a new router is one file plus one registry line, options included;
``moelab.config.RouterConfig`` carries the options a user gave as plain data and the router reads
them with :func:`parse_options` when the model is built or a run is assembled.

Configs written before routers owned their options list every option of every router (the old flat
``RouterConfig``) at its default; those keys are dropped when they hold their old default
(:data:`LEGACY_DEFAULTS`), and refused by name otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from moelab.config import RouterConfig, check_field, from_dict
from moelab.errors import ConfigError

# The flat RouterConfig's fields and defaults before routers owned their options (checkpoints, YAML files).
LEGACY_DEFAULTS: dict[str, Any] = {
    "renormalize": True,
    "softmax_after_topk": False,
    "jitter_eps": 0.0,
    "noise_std": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "bias_update_rate": 0.001,
    "hash_seed": 0,
    "force_balanced": False,
}


@dataclass(frozen=True)
class RouterOptions:
    """Options every router takes."""

    force_balanced: bool = False  # uniform round-robin assignment, for throughput benchmarks


@dataclass(frozen=True)
class JitterOptions(RouterOptions):
    """Options of routers that take Switch's multiplicative input noise (``Router.jitter``)."""

    jitter_eps: float = 0.0  # inputs × U(1-eps, 1+eps), training only

    def __post_init__(self) -> None:
        check_field(self.jitter_eps >= 0, "moe.router.jitter_eps", self.jitter_eps, "must be >= 0")


def option_names(options_cls: type[RouterOptions]) -> list[str]:
    return [f.name for f in fields(options_cls)]


def parse_options(options_cls: type[RouterOptions], router: RouterConfig) -> RouterOptions:
    """``router.options`` read by ``options_cls``: types checked, defaults filled, the option's own checks
    run; an option the router does not take is a ConfigError naming it and the router's options."""
    given = dict(router.options)
    known = option_names(options_cls)
    unknown = [k for k, v in given.items() if k not in known and not (k in LEGACY_DEFAULTS and v == LEGACY_DEFAULTS[k])]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"moe.router.{k}={given[k]!r} is invalid: router {router.name!r} has no option {k!r} "
            f"(its options: {', '.join(known)})"
        )
    return from_dict(options_cls, {k: v for k, v in given.items() if k in known}, prefix="moe.router.")


def canonical_router(options_cls: type[RouterOptions], router: RouterConfig) -> RouterConfig:
    """The same router with every option it takes, at its resolved value, and nothing else: the form a
    run saves, so a resumed run compares equal to it whatever spelling it was given in."""
    return RouterConfig(router.name, asdict(parse_options(options_cls, router)))


__all__ = ["LEGACY_DEFAULTS", "JitterOptions", "RouterOptions", "canonical_router", "option_names", "parse_options"]
