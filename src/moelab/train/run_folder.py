"""A run folder: what moelab writes in it, and whether a run may start or continue there.

A run folder (``runs/NAME``) holds ``metrics.jsonl``, ``checkpoints/`` (complete ``step_N``
folders and ``.tmp-`` temporaries) and, with TensorBoard, ``tb/``. The rule of
:mod:`moelab.outputs`, for runs:

- a fresh run starts only in a missing or empty folder; an earlier run there is refused, naming
  ``--resume`` (continue it) and ``--overwrite`` (start again). Why: a fresh run used to truncate
  the earlier run's log, and keep-last then deleted the new checkpoint because the earlier run's
  later steps ranked higher;
- ``--overwrite`` deletes the earlier run's own entries (above) and refuses a folder that holds
  anything else, naming it;
- ``--resume`` continues from the newest complete checkpoint; a folder that is not empty but has
  none is refused, since there is nothing to continue and starting afresh would truncate its log.
"""

from __future__ import annotations

from pathlib import Path

from moelab.checkpoint.folder import CHECKPOINT, CKPT_PREFIX, MARKER, list_checkpoints
from moelab.errors import UserError
from moelab.outputs import TMP_PREFIX, OutputKind, check_output, clear_output, first_foreign
from moelab.train.logging import METRICS_FILE, TB_DIR, TB_EVENTS_PREFIX

CHECKPOINTS_DIR = "checkpoints"
START_HINT = (
    "pass --resume to continue that run, or --overwrite to start it again (deletes its checkpoints and "
    f"{METRICS_FILE}), or give another --out"
)


def foreign_in_checkpoints(folder: Path) -> Path | None:
    """The first entry of a run's ``checkpoints/`` folder that moelab did not write, or None.

    moelab writes complete checkpoint folders (``step_N`` with the completion marker and nothing
    but checkpoint files) and ``.tmp-`` temporaries; a ``step_`` folder without its marker is not
    recognised (it may be a user's copy), so ``--overwrite`` refuses rather than deletes it.
    """
    for p in sorted(folder.iterdir()):
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            continue
        step = p.name[len(CKPT_PREFIX) :]
        if not (p.is_dir() and p.name.startswith(CKPT_PREFIX) and step.isdigit() and (p / MARKER).is_file()):
            return p
        inner = first_foreign(p, CHECKPOINT)
        if inner is not None:
            return inner
    return None


def _foreign(entry: Path) -> Path | None:
    """The first path in ``entry`` (one entry of a run folder) that moelab did not write, or None."""
    if entry.is_symlink():
        return entry
    if entry.name == METRICS_FILE and entry.is_file():
        return None
    if entry.name == CHECKPOINTS_DIR and entry.is_dir():
        return foreign_in_checkpoints(entry)
    if entry.name == TB_DIR and entry.is_dir():
        events = (p for p in sorted(entry.iterdir()) if not (p.is_file() and p.name.startswith(TB_EVENTS_PREFIX)))
        return next(events, None)
    return entry


RUN_FOLDER = OutputKind("run folder", _foreign)


def _has_marked_checkpoint(run: Path) -> bool:
    """Cheap (no hashing): whether a checkpoint with its completion marker exists; the trainer verifies it."""
    return any((p / MARKER).is_file() for p in list_checkpoints(run))


def _refuse_nothing_to_resume(run: Path) -> None:
    if run.is_dir() and any(run.iterdir()):
        raise UserError(
            f"--resume: {run} holds no complete checkpoint to continue from; start it again with --overwrite "
            "(instead of --resume), or give another --out"
        )


def check_run_folder(run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any slow work, a run folder where this run could lose data. Reads only.

    ``resume``: the folder must be missing, empty, or hold a checkpoint to continue from.
    Otherwise it must be missing or empty, or (``overwrite``) hold nothing but an earlier run.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the run, or start it again")
    run = Path(run_dir)
    if resume:
        if not _has_marked_checkpoint(run):
            _refuse_nothing_to_resume(run)
        return
    check_output(run, RUN_FOLDER, overwrite=overwrite, hint=START_HINT)


def start_run_folder(run_dir: str | Path, *, overwrite: bool = False, resume_asked: bool = False) -> None:
    """Make ``run_dir`` ready for a run from step 0 (no checkpoint was resumed).

    Refused when not empty (see the module doc); with ``overwrite`` the earlier run's entries are
    deleted first, each renamed out of the way before removal.
    """
    run = Path(run_dir)
    if resume_asked:
        _refuse_nothing_to_resume(run)
    check_output(run, RUN_FOLDER, overwrite=overwrite, hint=START_HINT)
    if overwrite:
        clear_output(run, RUN_FOLDER)
