"""A study's folder (``--out``/NAME): what a study writes there, and whether it may run there.

A study trains its arms into ``OUT/NAME`` (``ARM/seedS/`` run folders; iso-flop's dense ladders
``dense_ladder/seedS/branch/steps_B/`` with ``branch.json`` and ``ladder.json``), draws its figure
``NAME.png`` there, and hybrid-inference keeps its offload stores in a ``.tmp-`` folder while it
runs. The rule of :mod:`moelab.outputs`, for studies:

- a study runs only into a missing or empty folder: an earlier run of the study there is refused
  *before any data is prepared*, naming ``--overwrite``. Why: the trainer used to refuse only at the
  first arm, after the corpus was prepared, naming ``--resume``, which ``moelab study`` has not;
- ``--overwrite`` deletes the earlier study's own entries (run folders with complete checkpoints,
  their logs, the ladders' records, the figure, temporaries) and refuses a folder holding anything
  else, naming it;
- the folder is not staged as a whole: a study trains for up to an hour, each run's checkpoints are
  already written atomically, and its run folders' paths are recorded in its numbers (ladders).

The page (``--docs``: ``NAME.md``, ``NAME.json``, ``NAME.png``, ``README.md``) is generated, never
hand-edited, and rewritten by every run and ``--rescore`` by design; each file is replaced in one
step (:mod:`moelab.studies.page`).
"""

from __future__ import annotations

from pathlib import Path

from moelab.outputs import TMP_PREFIX, OutputKind, check_output, clear_output
from moelab.train.run_folder import RUN_FOLDER

LADDER_FILES = ("branch.json", "ladder.json")  # written by moelab.experiment.ladder beside/above its runs
MAX_DEPTH = 5  # OUT/NAME/dense_ladder/seedS/branch/steps_B is a run folder four levels down
HINT = (
    "give another --out, or pass --overwrite to run the study again there (deletes its earlier runs and "
    "figure; the page in --docs is rewritten either way)"
)


def _foreign_in_runs(folder: Path, depth: int) -> Path | None:
    """The first path under ``folder`` that is not part of moelab runs, or None.

    ``folder`` may be a run folder, a ladder, or a folder of those (``depth`` levels at most).
    """
    if folder.is_symlink() or not folder.is_dir():
        return folder
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            continue
        bad = RUN_FOLDER.foreign(entry)
        if bad is None:
            continue
        if bad != entry:  # a run folder's own entry (checkpoints/, tb/) holding something else
            return bad
        if entry.name in LADDER_FILES and entry.is_file() and not entry.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink() and depth > 1:
            inner = _foreign_in_runs(entry, depth - 1)
            if inner is not None:
                return inner
            continue
        return entry
    return None


def _foreign(entry: Path) -> Path | None:
    """The first path in ``entry`` (one entry of ``OUT/NAME``) that the study did not write, or None."""
    if entry.name.startswith(TMP_PREFIX):
        return None
    if entry.name == f"{entry.parent.name}.png" and entry.is_file() and not entry.is_symlink():
        return None
    if entry.is_dir() and not entry.is_symlink():
        return _foreign_in_runs(entry, MAX_DEPTH)
    return entry


STUDY_FOLDER = OutputKind("study folder", _foreign)


def claim_study_folder(folder: str | Path, overwrite: bool = False) -> Path:
    """Refuse ``folder`` when the study could lose data there; with ``overwrite`` delete the earlier
    study's own entries. Call before any slow work. Returns the folder as a Path."""
    path = check_output(folder, STUDY_FOLDER, overwrite=overwrite, hint=HINT)
    if overwrite:
        clear_output(path, STUDY_FOLDER)
    return path
