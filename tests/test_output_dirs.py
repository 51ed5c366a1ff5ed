"""Output folders: made where missing, and a place that cannot hold one is a one-line error naming it,
from the library helper and from every command that writes a folder of results."""

import pytest

from or_agent.pipelines.errors import InputError
from or_agent.pipelines.files import make_output_dir, output_dir
from tests.conftest import run_cli


def test_a_missing_folder_is_made_with_its_parents_and_an_existing_one_kept(tmp_path):
    made = make_output_dir(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b" and made.is_dir()
    (made / "kept.txt").write_text("x")
    assert make_output_dir(made) == made and (made / "kept.txt").read_text() == "x"


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"^.*/f: exists and is not a directory$"):
        make_output_dir(tmp_path / "f")
    with pytest.raises(InputError) as err:
        make_output_dir(tmp_path / "f" / "sub")  # its parent is a file
    assert str(err.value) == f"{tmp_path / 'f' / 'sub'}: cannot create the directory (Not a directory)"


def test_a_command_that_writes_nothing_leaves_no_folder_behind(tmp_path):
    with output_dir(tmp_path / "a" / "b" / "c") as out:
        assert out.is_dir()
    assert not (tmp_path / "a").exists()  # every folder it made, and only those, removed again
    with pytest.raises(RuntimeError), output_dir(tmp_path / "x" / "y"):
        raise RuntimeError("the command failed")
    assert not (tmp_path / "x").exists()
    (tmp_path / "kept").mkdir()
    with output_dir(tmp_path / "kept" / "new"):
        pass
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()


def test_results_and_folders_that_were_there_stay(tmp_path):
    with output_dir(tmp_path / "a" / "b") as out:
        (out / "report.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "report.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    with output_dir(tmp_path / "empty"):
        pass
    assert (tmp_path / "empty").is_dir()  # the user's own folder, empty or not, is never removed


def test_a_replay_of_nothing_replayable_leaves_no_output_folder(tmp_path):
    (tmp_path / "bad.mp4").write_text("not a video\n")
    proc = run_cli("replay", str(tmp_path / "bad.mp4"), "--out", str(tmp_path / "out" / "run1"))
    assert proc.returncode == 1 and "0 of 1 videos replayed, 1 failed" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [
    ("synth", "--videos", "1", "--out"),
    ("replay", "VIDEO", "--out"),
    ("qualify", "--out"),
    ("models", "keygen", "--out"),
])
def test_commands_name_an_output_folder_they_cannot_make(tmp_path, small_dataset, command):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" / "out"
    args = [str(small_dataset / "video01.mp4") if a == "VIDEO" else a for a in command]
    proc = run_cli(*args, str(target))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"or-agent: error: {target}: cannot create the directory (Not a directory)"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", [
    ("replay", "VIDEO", "--out"),
    ("archive", "run", "VIDEO", "--ray", "local", "--out"),
    ("demo", "--out"),
    ("certs", "--box", "or-box-1", "--out"),
])
def test_commands_name_a_file_where_their_output_folder_goes_before_starting(tmp_path, small_dataset, command):
    """Checked before the slow start (listing videos, loading models, starting Ray, making a surgery)."""
    target = tmp_path / "f"
    target.write_text("x")
    args = [str(small_dataset / "video01.mp4") if a == "VIDEO" else a for a in command]
    proc = run_cli(*args, str(target))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"or-agent: error: {target}: exists and is not a directory"
    assert target.read_text() == "x"
