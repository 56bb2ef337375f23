"""Document: one text with a stable id and its labels (``domain``, ``lang``, ``source``, …).

Why labels travel with text: routing analysis asks which experts take which domain or
language, so every token must be traceable back to its document's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    labels: dict[str, str] = field(default_factory=dict)
