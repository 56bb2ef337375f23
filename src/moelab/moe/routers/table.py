"""The routers table of docs/routers.md, generated from the registry: each router's class attributes
(paper, formula, balancing, flags, notes) and its own options with their defaults.

Why generated: a router added in one file appears in ``moelab routers --markdown`` and in the docs the
moment it is registered; a test keeps the committed page equal to this output.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from moelab.moe.routers.base import ROUTERS, Router

HEADER = (
    "| router | paper | formula | causal-safe? | learned? | balancing method | options (`moe.router.*`, default) |\n"
    "|---|---|---|---|---|---|---|"
)


def _value(v: Any) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, repr(v)) if isinstance(v, (bool, type(None))) else repr(v)


def options_cell(router: type[Router]) -> str:
    """``name = default`` (in backticks) for each option (the router's own first, the shared ones last), then its note."""
    own = [f for f in fields(router.Options)]
    own.sort(key=lambda f: f.name == "force_balanced")
    items = [f"`{f.name}` = {_value(f.default if f.default is not MISSING else None)}" for f in own]
    cell = ", ".join(items)
    return f"{cell}; {router.options_note}" if router.options_note else cell


def _flag(on: bool, note: str, bold_no: bool = False) -> str:
    word = "yes" if on else ("**no**" if bold_no else "no")
    return f"{word}: {note}" if note and not on else (f"{word} ({note})" if note else word)


def router_row(name: str, router: type[Router]) -> str:
    cells = [
        f"`{name}`",
        router.paper,
        router.formula,
        _flag(router.causal_safe, router.causal_note, bold_no=True),
        _flag(router.learned, router.learned_note),
        router.balancing,
        options_cell(router),
    ]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def router_table_markdown() -> str:
    """The whole table, one row per registered router, in registry order."""
    return "\n".join([HEADER, *(router_row(name, cls) for name, cls in ROUTERS.items())]) + "\n"


__all__ = ["options_cell", "router_row", "router_table_markdown"]
