"""Checkpoint I/O: folders, markers, training state (docs/design.md, layers: below every model-building layer)."""
