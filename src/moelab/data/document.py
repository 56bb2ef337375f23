"""Document: one text with a stable id, its labels (``domain``, ``lang``, ``source``, …) and, when the
corpus brings one, the split it belongs to.

Why labels travel with text: routing analysis asks which experts take which domain or
language, so every token must be traceable back to its document's labels.

Why ``split`` is a field and not a label: labels become per-token streams that analysis breaks
results down by, and the cap spreads over them; which split a document is in is neither. A
corpus that ships its own validation split (a HF ``DatasetDict`` with a ``validation`` split)
marks its documents ``train`` / ``validation``; every other corpus leaves ``split`` None and
:func:`moelab.data.loader.split_documents` splits it by a seeded hash of the id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRAIN = "train"
VALIDATION = "validation"


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    labels: dict[str, str] = field(default_factory=dict)
    split: str | None = None  # TRAIN | VALIDATION when the corpus brings its own split; None = split by hash
