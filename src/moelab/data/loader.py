"""Documents → packed token blocks with per-token labels; a deterministic, resumable sampler.

Packing: each split's documents are tokenised and concatenated, each followed by EOS, into
one stream, cut into blocks of ``seq_len + 1`` tokens (the tail is dropped). A block gives
``input_ids = block[:-1]`` and ``labels = block[1:]``: labels are already shifted (the model
does not shift), and a position whose input is EOS gets label ``-100`` (predicting the first
token of an unrelated document teaches nothing). So a label always belongs to the same
document as its input, and per-token label arrays (``domain``, ``lang``, ``source`` ids and
``doc`` ids) taken at the input position describe the predicted token too.

Split: by document, per ``domain`` (so every domain appears in validation), by a seeded hash
of the document id: adding documents does not reshuffle the others. A corpus that brings its own
validation split (documents with ``split`` set, e.g. a HF ``DatasetDict``) keeps it as it is.

Legend: B batch, S sequence length, N tokens in a split's stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.config import IGNORE_INDEX
from moelab.data.document import VALIDATION, Document
from moelab.data.tokenizer import Tokenizer
from moelab.errors import UserError


@dataclass
class Batch:
    """One batch. ``label_ids[name]`` are ``[B, S]`` ids into ``PackedData.label_names[name]``."""

    input_ids: Tensor  # [B, S] long
    labels: Tensor  # [B, S] long, shifted, -100 = ignore
    label_ids: dict[str, Tensor]  # name → [B, S] long (domain, lang, source)
    doc_ids: Tensor  # [B, S] long, index into PackedData.doc_names

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class PackedData:
    """One split as flat token and label streams, cut into ``seq_len + 1`` blocks on access."""

    tokens_N: Tensor  # int32
    label_ids_N: dict[str, Tensor]  # name → int16/int32 stream
    doc_N: Tensor  # int32
    label_names: dict[str, list[str]]  # name → id → string
    doc_names: list[str]
    seq_len: int
    eos_id: int

    @property
    def num_blocks(self) -> int:
        return int(self.tokens_N.numel()) // (self.seq_len + 1)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_N.numel())

    def subset(self, block_idx: list[int]) -> PackedData:
        """Only the blocks ``block_idx``, in that order (a domain's blocks, a repeated-data subset)."""
        L = self.seq_len + 1
        pos = (torch.as_tensor(block_idx, dtype=torch.long)[:, None] * L + torch.arange(L)[None, :]).reshape(-1)
        return PackedData(
            self.tokens_N[pos],
            {k: v[pos] for k, v in self.label_ids_N.items()},
            self.doc_N[pos],
            self.label_names,
            self.doc_names,
            self.seq_len,
            self.eos_id,
        )

    def batch(self, block_idx: Tensor | list[int]) -> Batch:
        """The blocks ``block_idx`` as a :class:`Batch`."""
        idx_B = torch.as_tensor(block_idx, dtype=torch.long)
        L = self.seq_len + 1
        pos_BL = idx_B[:, None] * L + torch.arange(L)[None, :]
        tok_BL = self.tokens_N[pos_BL].long()
        inputs, labels = tok_BL[:, :-1], tok_BL[:, 1:].clone()
        labels[inputs == self.eos_id] = IGNORE_INDEX
        pos_BS = pos_BL[:, :-1]
        return Batch(
            input_ids=inputs.contiguous(),
            labels=labels,
            label_ids={k: v[pos_BS].long() for k, v in self.label_ids_N.items()},
            doc_ids=self.doc_N[pos_BS].long(),
        )


def _hash01(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Train/validation split by document, per ``domain``, by a seeded hash of the id.

    Each domain with at least two documents puts ``max(1, round(val_fraction·n))`` of them in
    validation; order inside each split is the corpus order.

    A corpus that brings its own split (any document with ``split`` set) keeps it: the documents
    marked ``validation`` are the validation split, every other one trains, and ``val_fraction`` and
    ``seed`` are not used. Why here: the trainer, ``moelab eval``, compare and the routing analysis
    all split through this function, so they all see the corpus's own split.
    """
    if any(d.split is not None for d in docs):
        return [d for d in docs if d.split != VALIDATION], [d for d in docs if d.split == VALIDATION]
    by_domain: dict[str, list[Document]] = {}
    for d in docs:
        by_domain.setdefault(d.labels.get("domain", "text"), []).append(d)
    val_ids: set[str] = set()
    for group in by_domain.values():
        if len(group) < 2:
            continue
        n_val = max(1, round(val_fraction * len(group)))
        ranked = sorted(group, key=lambda d: _hash01(f"{seed}:{d.id}"))
        val_ids.update(d.id for d in ranked[:n_val])
    train = [d for d in docs if d.id not in val_ids]
    val = [d for d in docs if d.id in val_ids]
    return train, val


def pack(
    docs: list[Document],
    tokenizer: Tokenizer,
    seq_len: int,
    label_names: dict[str, list[str]] | None = None,
) -> PackedData:
    """Tokenise and pack ``docs`` (each followed by EOS) with per-token label streams.

    ``label_names`` fixes the id of each label value (share it between splits so ids agree);
    values not in it are appended.
    """
    names = {k: list(v) for k, v in (label_names or {}).items()}
    for d in docs:
        for k in d.labels:
            names.setdefault(k, [])
    index = {k: {v: i for i, v in enumerate(vs)} for k, vs in names.items()}
    ids_per_doc = tokenizer.encode_batch([d.text for d in docs])
    lengths = [len(ids) + 1 for ids in ids_per_doc]
    flat: list[int] = []
    for ids in ids_per_doc:
        flat.extend(ids)
        flat.append(tokenizer.eos_id)
    tokens = torch.tensor(flat, dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.long)
    doc_N = torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), lens)
    label_streams = {}
    for k in names:
        per_doc = []
        for d in docs:
            v = d.labels.get(k, "")
            if v not in index[k]:
                index[k][v] = len(names[k])
                names[k].append(v)
            per_doc.append(index[k][v])
        label_streams[k] = torch.repeat_interleave(torch.tensor(per_doc, dtype=torch.int32), lens)
    return PackedData(tokens, label_streams, doc_N, names, [d.id for d in docs], seq_len, tokenizer.eos_id)


@dataclass
class DataSplits:
    train: PackedData
    val: PackedData


def build_splits(docs: list[Document], tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int) -> DataSplits:
    """Split, tokenise and pack; raises UserError when a split is too small for one block."""
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    if not val_docs:
        raise UserError(f"corpus has too few documents ({len(docs)}) for a validation split: add documents")
    train = pack(train_docs, tokenizer, seq_len)
    val = pack(val_docs, tokenizer, seq_len, train.label_names)
    for name, split in (("training", train), ("validation", val)):
        if split.num_blocks == 0:
            raise UserError(
                f"the {name} split has {split.num_tokens} tokens, fewer than one block of data.seq_len+1="
                f"{seq_len + 1}: add text or lower data.seq_len"
            )
    return DataSplits(train, val)


@dataclass
class Sampler:
    """Deterministic, resumable order over blocks: a seeded permutation per epoch.

    The whole state is three integers (``seed``, ``epoch``, ``pos``), saved as JSON in
    checkpoints; a resumed sampler yields exactly the batches the uninterrupted one would.
    """

    num_blocks: int
    seed: int = 0
    epoch: int = 0
    pos: int = 0
    _perm: Tensor | None = field(default=None, repr=False)

    def _order(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.num_blocks, generator=g)
        return self._perm

    def next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order()
            take = min(n - len(out), self.num_blocks - self.pos)
            out.extend(order[self.pos : self.pos + take].tolist())
            self.pos += take
            if self.pos >= self.num_blocks:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"num_blocks": self.num_blocks, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_blocks"] != self.num_blocks:
            raise UserError(
                f"the checkpoint's sampler saw {state['num_blocks']} training blocks, this data has "
                f"{self.num_blocks}: resume with the same data and tokenizer"
            )
        self.seed, self.epoch, self.pos, self._perm = state["seed"], state["epoch"], state["pos"], None


def evenly_spaced(total: int, n: int) -> list[int]:
    """``n`` block indices spread evenly over ``range(total)``: a sample of every domain, since
    documents are stored grouped by domain."""
    return [(i * total) // n for i in range(n)]


def repeated_subset(data: PackedData, fraction: float) -> PackedData:
    """``data.train_fraction``: a fraction of the training blocks, evenly spaced over the split so
    that every domain keeps its share; trained for the same steps, it is read more epochs."""
    if fraction >= 1.0:
        return data
    return data.subset(evenly_spaced(data.num_blocks, max(1, round(data.num_blocks * fraction))))


def eval_batches(data: PackedData, batch_size: int, max_batches: int | None = None) -> list[Batch]:
    """Validation batches: all blocks, or ``max_batches·batch_size`` blocks evenly spaced over the
    split (documents are grouped by domain, so the first blocks alone would miss domains).
    The same batches every time."""
    total = data.num_blocks
    idx = evenly_spaced(total, total if max_batches is None else min(total, max_batches * batch_size))
    return [data.batch(idx[i : i + batch_size]) for i in range(0, len(idx), batch_size)]
