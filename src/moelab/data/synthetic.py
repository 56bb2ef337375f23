"""Synthetic, seeded, labelled text domains with known structure.

Why: routing-specialisation claims need ground truth. Each generator here writes documents of
one kind whose structure is exact (an arithmetic result is right, brackets balance, a list is
sorted), so analysis can ask "does expert 3 take the arithmetic tokens?" with certainty.
Every generator is a pure function of a ``random.Random``; the same seed gives the same text.

Domains (label ``domain``; ``lang`` is ``synthetic`` except ``zorbish``, a made-up language):
``arithmetic``, ``brackets``, ``records``, ``lists``, ``zorbish``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from moelab.data.document import Document
from moelab.registry import Registry

GENERATORS: Registry[Callable[[random.Random], str]] = Registry("synthetic domain")


@GENERATORS.register("arithmetic")
def arithmetic(rng: random.Random) -> str:
    """Lines like ``17 + 4 * 3 = 29``: results are exact (integer arithmetic)."""
    lines = []
    for _ in range(rng.randint(4, 12)):
        n = rng.randint(2, 4)
        terms = [str(rng.randint(0, 99)) for _ in range(n)]
        ops = [rng.choice("+-*") for _ in range(n - 1)]
        expr = terms[0] + "".join(f" {o} {t}" for o, t in zip(ops, terms[1:]))
        lines.append(f"{expr} = {eval(expr, {'__builtins__': {}})}")  # only digits and + - * reach eval
    return "\n".join(lines)


@GENERATORS.register("brackets")
def brackets(rng: random.Random) -> str:
    """Balanced strings over ``()[]{}<>`` (a Dyck language), one per line."""
    pairs = ["()", "[]", "{}", "<>"]
    lines = []
    for _ in range(rng.randint(3, 8)):
        out, stack = [], []
        for _ in range(rng.randint(4, 40)):
            if stack and (rng.random() < 0.45):
                out.append(stack.pop())
            else:
                o, c = rng.choice(pairs)
                out.append(o)
                stack.append(c)
        out.extend(reversed(stack))
        lines.append("".join(out))
    return "\n".join(lines)


_KEYS = ["id", "name", "city", "age", "score", "color", "size", "status"]
_NAMES = ["ada", "bob", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jon"]
_CITIES = ["oslo", "lima", "rome", "kyiv", "pune", "nice", "bern", "cork"]
_COLORS = ["red", "green", "blue", "amber", "teal", "black"]


@GENERATORS.register("records")
def records(rng: random.Random) -> str:
    """``key=value`` records, one per line, with a fixed key order per document."""
    keys = rng.sample(_KEYS, rng.randint(3, 6))
    values: dict[str, Callable[[], str]] = {
        "id": lambda: str(rng.randint(1000, 9999)),
        "name": lambda: rng.choice(_NAMES),
        "city": lambda: rng.choice(_CITIES),
        "age": lambda: str(rng.randint(18, 90)),
        "score": lambda: f"{rng.random() * 100:.1f}",
        "color": lambda: rng.choice(_COLORS),
        "size": lambda: rng.choice(["S", "M", "L", "XL"]),
        "status": lambda: rng.choice(["ok", "fail", "wait"]),
    }
    return "\n".join(" ".join(f"{k}={values[k]()}" for k in keys) for _ in range(rng.randint(3, 10)))


@GENERATORS.register("lists")
def lists(rng: random.Random) -> str:
    """``sort: 5 2 9 -> 2 5 9`` and ``reverse: a b c -> c b a`` tasks with exact answers."""
    lines = []
    for _ in range(rng.randint(4, 10)):
        xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 9))]
        task = rng.choice(["sort", "reverse"])
        ys = sorted(xs) if task == "sort" else xs[::-1]
        lines.append(f"{task}: {' '.join(map(str, xs))} -> {' '.join(map(str, ys))}")
    return "\n".join(lines)


_SYLLABLES = ["zor", "bik", "ta", "mun", "el", "qua", "vy", "dro", "shi", "ka", "lo", "nep", "ur", "gim"]
_ZORB_WORDS = sorted({a + b for a in _SYLLABLES for b in _SYLLABLES[:7]})[:80]


@GENERATORS.register("zorbish")
def zorbish(rng: random.Random) -> str:
    """A made-up language: its own 80-word vocabulary, subject-verb-object sentences."""
    nouns, verbs = _ZORB_WORDS[:50], _ZORB_WORDS[50:]
    sentences = []
    for _ in range(rng.randint(3, 9)):
        words = [rng.choice(nouns), rng.choice(verbs), rng.choice(nouns)]
        if rng.random() < 0.5:
            words += ["ka", rng.choice(nouns)]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def synthetic_documents(docs_per_domain: int, seed: int = 0, domains: list[str] | None = None) -> list[Document]:
    """``docs_per_domain`` documents of every synthetic domain, seeded per domain."""
    out = []
    for name in domains or list(GENERATORS):
        gen = GENERATORS[name]
        rng = random.Random(f"{seed}:{name}")
        lang = "zorbish" if name == "zorbish" else "synthetic"
        for i in range(docs_per_domain):
            out.append(
                Document(id=f"synthetic/{name}/{i}", text=gen(rng), labels={"domain": name, "lang": lang, "source": "synthetic"})
            )
    return out
