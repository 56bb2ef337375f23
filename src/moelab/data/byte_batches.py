"""Batches of raw UTF-8 bytes from a text file: calibration and evaluation data for ``moefy``, ``merge`` and ``prune``.

Why bytes: these commands work on models converted from anywhere, whose tokenizer moelab may not
have; a model with a vocabulary of at least 256 reads byte ids directly (the bytes tokenizer's ids).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from moelab.errors import UserError


def byte_batches(
    path: str, vocab_size: int, seq_len: int, count: int, seed: int, offset: int = 0
) -> list[torch.Tensor]:
    """``count`` batches ``[8, seq_len]`` of UTF-8 byte ids at seeded random offsets of a .txt or
    .jsonl(.gz) file (its "text" fields; the first 2,000 lines or 4 MB). ``offset`` shifts the seed
    so that calibration and evaluation draw different windows."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data {path!r} does not exist")
    if vocab_size < 256:
        raise UserError(f"--data is read as UTF-8 bytes, which needs vocab_size >= 256 (this model has {vocab_size})")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        if ".jsonl" in p.name:
            text = "\n".join(json.loads(line).get("text", "") for _, line in zip(range(2000), f) if line.strip())
        else:
            text = f.read(4_000_000)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if len(data) <= seq_len + 1:
        raise UserError(f"--data {path!r} has too little text for --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed + offset)
    starts = torch.randint(0, len(data) - seq_len, (count, 8), generator=g)
    return [torch.stack([data[s : s + seq_len] for s in row.tolist()]) for row in starts]
