"""moelab.outputs: the rule every writing command follows (refuse, overwrite only moelab's own, atomic)."""

from __future__ import annotations

import os

import pytest

from moelab.errors import UserError
from moelab.outputs import (
    TMP_PREFIX,
    atomic_write_text,
    check_output,
    clear_output,
    files_kind,
    overlaps,
    staged_folder,
)

KIND = files_kind("test folder", ("a.txt", "b.txt"))


def _folder(path, **files: str):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path


def test_missing_and_empty_folders_are_accepted_and_nothing_is_created(tmp_path) -> None:
    assert check_output(tmp_path / "new", KIND) == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", KIND)


def test_a_non_empty_folder_is_refused_with_the_flag_and_left_alone(tmp_path) -> None:
    out = _folder(tmp_path / "out", a_txt="old")
    with pytest.raises(UserError, match=r"already exists and is not empty.*--overwrite") as err:
        check_output(out, KIND)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="pass --resume"):
        check_output(out, KIND, hint="pass --resume")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output(tmp_path / "file", KIND, overwrite=True)
    assert (out / "a.txt").read_text() == "old"


def test_overwrite_deletes_only_its_own_and_names_a_foreign_file(tmp_path) -> None:
    out = _folder(tmp_path / "out", a_txt="old", notes_md="mine")
    with pytest.raises(UserError, match=r"holds notes\.md, which moelab did not write as a test folder"):
        check_output(out, KIND, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "notes.md"]
    (out / "notes.md").unlink()
    check_output(out, KIND, overwrite=True)
    clear_output(out, KIND)
    assert list(out.iterdir()) == []


def test_an_output_on_inside_or_around_a_source_is_refused_even_with_overwrite(tmp_path) -> None:
    src = _folder(tmp_path / "run" / "src", a_txt="weights")
    assert overlaps(src, src) and overlaps(src / "x", src) and overlaps(tmp_path / "run", src)
    assert not overlaps(tmp_path / "run" / "other", src)
    for out, where in ((src, "is"), (src / "q", "lies inside"), (tmp_path / "run", "holds")):
        with pytest.raises(UserError, match=f"{where} the source"):
            check_output(out, KIND, overwrite=True, sources=[src])
    assert (src / "a.txt").read_text() == "weights"


def test_staged_folder_appears_whole_or_not_at_all(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(out, KIND) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed half way")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no temporary left
    with staged_folder(out, KIND) as tmp:
        assert tmp.name.startswith(TMP_PREFIX) and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_folder_replaces_only_with_overwrite_and_keeps_the_old_on_failure(tmp_path) -> None:
    out = _folder(tmp_path / "out", a_txt="old", b_txt="old")
    with pytest.raises(UserError, match="not empty"), staged_folder(out, KIND) as tmp:
        pytest.fail("the check comes before any work")
    with pytest.raises(RuntimeError), staged_folder(out, KIND, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError
    assert (out / "a.txt").read_text() == "old" and (out / "b.txt").exists()
    with staged_folder(out, KIND, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_that_appears_while_writing_is_not_replaced(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not empty"), staged_folder(out, KIND) as tmp:
        (tmp / "a.txt").write_text("new")
        _folder(out, a_txt="someone else's")
    assert (out / "a.txt").read_text() == "someone else's"


def test_atomic_write_text_replaces_in_one_step(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text("old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]
    assert not any(str(os.getpid()) in p.name for p in tmp_path.iterdir())
