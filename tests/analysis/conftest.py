"""Make ``cases`` (this folder's helper module) importable from the analysis tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
