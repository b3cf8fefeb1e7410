"""Hostile inputs: a symlink loop among the images, an incomplete standard layout, manifests and
configs that are not UTF-8, outputs that cannot be written where asked, and two runs started
in one folder. Each is one line on stderr with exit status 2, and nothing on disk is damaged."""

from __future__ import annotations

import codecs
import os
import shutil
import signal

import pytest

from fakedata import make_folder_tree, make_market_tree, make_msmt_tree
from marreid.data import load_dataset
from marreid.data.msmt17 import read_list
from marreid.data.sample import list_images
from marreid.engine import extract as extract_module
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.preflight import LOCK_FILE, lock_run_dir, prepare_run_dir
from marreid.engine.stages import clear_stage
from marreid.errors import ConfigError, DatasetError
from test_robustness_helpers import cli, copy_tree, make_run_data

LOOP_NAME = "0999_c1s1_000001_00.jpg"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_run_data(tmp_path_factory.mktemp("robust_inputs"))


def symlink_loop(folder):
    """An image name that is a symbolic link to itself: every stat of it fails with ELOOP."""
    loop = folder / LOOP_NAME
    os.symlink(LOOP_NAME, loop)
    return loop


# --- a symlink loop ---------------------------------------------------------------------------

def test_symlink_loop_is_listed_so_the_image_checks_name_it(tmp_path):
    make_market_tree(tmp_path)
    loop = symlink_loop(tmp_path / "bounding_box_train")
    assert loop in list_images(tmp_path / "bounding_box_train")


def test_symlink_loop_is_named_by_data_verify(tmp_path, capsys):
    make_market_tree(tmp_path)
    loop = symlink_loop(tmp_path / "query")
    code, err = cli(capsys, "data", "verify", tmp_path)
    assert code == 2
    assert err[0].startswith(f"bad image {loop}: [Errno 40] Too many levels of symbolic links")
    assert "Traceback" not in "\n".join(err)


def test_symlink_loop_stops_train_before_the_first_step_or_is_skipped(data, tmp_path, capsys):
    tgt = copy_tree(data["tgt"], tmp_path / "tgt")
    loop = symlink_loop(tgt / "bounding_box_train")
    args = ["train", data["config"], "--set", f"data.target_root={tgt}"]
    code, err = cli(capsys, *args, "--run-dir", tmp_path / "refused")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid train: error: unreadable image in {tgt} (train): {loop} ([Errno 40] ")
    assert not (tmp_path / "refused" / "last.pt").exists()

    code, err = cli(capsys, *args, "--run-dir", tmp_path / "skipped", "--skip-bad-images")
    assert code == 0 and err[0].startswith(f"skipping 1 unreadable image(s) of {tgt} (train), e.g. {loop} (")


def test_symlink_loop_in_a_query_is_one_line_for_evaluate(data, tmp_path, capsys):
    tgt = copy_tree(data["tgt"], tmp_path / "tgt")
    loop = symlink_loop(tgt / "query")
    code, err = cli(capsys, "evaluate", data["pre"] / "last.pt", "--dataset-root", tgt)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid evaluate: error: cannot read image {loop}: [Errno 40] ")


# --- an incomplete standard layout ------------------------------------------------------------

def _market_without_query(root):
    make_market_tree(root)
    shutil.rmtree(root / "query")
    return f"missing folder {root / 'query'}: {root} looks like a Market-1501-style dataset"


def _nested_market_without_gallery(root):
    inner = root / "Market-1501-v15.09.15"
    make_market_tree(inner)
    shutil.rmtree(inner / "bounding_box_test")
    return f"missing folder {inner / 'bounding_box_test'}: {inner} looks like a Market-1501-style dataset"


def _msmt_without_train_list(root):
    make_msmt_tree(root)
    (root / "list_train.txt").unlink()
    return f"missing {root / 'list_train.txt'}: {root} looks like MSMT17"


def _msmt_without_train_images(root):
    make_msmt_tree(root)
    (root / "train").rename(root / "train_images")
    return f"missing {root / 'train'}: {root} looks like MSMT17"


@pytest.mark.parametrize("damage", [_market_without_query, _nested_market_without_gallery, _msmt_without_train_list,
                                    _msmt_without_train_images])
@pytest.mark.parametrize("action", ["summary", "verify"])
def test_incomplete_standard_layout_names_what_is_missing(tmp_path, capsys, damage, action):
    expected = damage(tmp_path)
    code, err = cli(capsys, "data", action, tmp_path)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid data: error: {expected}")


def test_folder_dataset_with_split_folders_is_still_a_folder_dataset(tmp_path):
    make_folder_tree(tmp_path, splits=True)
    assert load_dataset(None, tmp_path).name == "folder"


# --- text files that are not UTF-8 ------------------------------------------------------------

def test_manifest_with_a_non_utf8_byte_names_the_file_offset_and_line(tmp_path, capsys):
    make_folder_tree(tmp_path, form="csv")
    manifest = tmp_path / "manifest.csv"
    lines = manifest.read_bytes().splitlines(keepends=True)
    damaged = lines[0] + lines[1].replace(b",", b"\xe9,", 1) + b"".join(lines[2:])
    manifest.write_bytes(damaged)
    offset = len(lines[0]) + lines[1].index(b",")
    code, err = cli(capsys, "data", "summary", manifest)
    assert (code, err) == (2, [f"marreid data: error: {manifest}: not UTF-8 text (byte 0xe9 at offset {offset}, "
                               f"line 2); save it as UTF-8"])


def test_manifest_with_a_byte_order_mark_reads_like_without(tmp_path):
    make_folder_tree(tmp_path, form="csv")
    manifest = tmp_path / "manifest.csv"
    plain = load_dataset(None, manifest)
    manifest.write_bytes(codecs.BOM_UTF8 + manifest.read_bytes())  # as Excel saves "CSV UTF-8"
    marked = load_dataset(None, manifest)
    assert marked.train == plain.train and len(marked.train) > 0


def test_config_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("optim:\n  lr: 0.01  # réglage\n".encode("latin-1"))
    offset = config.read_bytes().index(b"\xe9")
    code, err = cli(capsys, "train", config)
    assert (code, err) == (2, [f"marreid train: error: {config}: not UTF-8 text (byte 0xe9 at offset {offset}, "
                               f"line 2); save it as UTF-8"])


# --- outputs that cannot be written where asked -----------------------------------------------

def forbidden(*args, **kwargs):
    raise AssertionError("features were computed before --out was checked")


def _query_image(data):
    return sorted((data["tgt"] / "query").glob("*.jpg"))[0]


@pytest.mark.parametrize("command", ["evaluate", "extract", "search"])
@pytest.mark.parametrize("case", ["under a file", "wrong kind"])
def test_unwritable_out_is_refused_before_any_work(data, tmp_path, capsys, monkeypatch, command, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    wants_folder = command == "search"
    if case == "under a file":
        out = blocker / "result"
        expected = f"--out: cannot create {out}: {blocker} is a file, not a folder"
    elif wants_folder:
        out = blocker
        expected = f"--out: {out} is a file; give a folder"
    else:
        out = tmp_path / "a_folder"
        expected = f"--out: {out} is a folder; give a file name"
    checkpoint = data["pre"] / "last.pt"
    argv = {"evaluate": ["evaluate", checkpoint, "--out", out],
            "extract": ["extract", checkpoint, "--split", "query", "--out", out],
            "search": ["search", _query_image(data), "--gallery", data["tgt"] / "bounding_box_test",
                       "--checkpoint", checkpoint, "--out", out]}[command]
    monkeypatch.setattr(extract_module, "extract_features", forbidden)
    code, err = cli(capsys, *argv)
    assert (code, err) == (2, [f"marreid {command}: error: {expected}"])
    assert blocker.read_text() == "not a folder" and not list((tmp_path / "a_folder").iterdir())


# --- two runs in one folder -------------------------------------------------------------------

def hold_lock_in_child(run_dir, key="output.run_dir") -> int:
    """A forked process that locks ``run_dir`` as a run does and keeps it until killed; its pid."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            lock_run_dir(run_dir, key)
            os.write(ready_w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def stop_child(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("command, key", [("train", "output.run_dir"), ("pretrain", "output.pretrain_dir")])
def test_second_run_into_a_busy_folder_is_refused_and_a_killed_holder_leaves_no_lock(data, tmp_path, capsys,
                                                                                    command, key):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock_in_child(run_dir, key)
    try:
        code, err = cli(capsys, command, data["config"], "--run-dir", run_dir)
    finally:
        stop_child(holder)  # SIGKILL: the kernel releases its lock
    assert (code, err) == (2, [f"marreid {command}: error: {key}: {run_dir} is in use by another marreid run "
                               f"(process {holder}); wait for it to end, or choose another run folder"])
    assert not (run_dir / "last.pt").exists() and not (run_dir / "log.jsonl").exists()

    code, err = cli(capsys, command, data["config"], "--run-dir", run_dir)
    assert code == 0, err
    assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    code, err = cli(capsys, command, "--run-dir", run_dir, "--resume")  # the process holding it, again
    assert code == 0, err
    assert load_checkpoint(run_dir / "last.pt")["step"] > 0


def test_only_rank_zero_locks_under_torchrun(tmp_path, monkeypatch):
    holder = hold_lock_in_child(tmp_path)
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert prepare_run_dir(tmp_path, "output.run_dir") == []
    finally:
        stop_child(holder)


def test_a_pipeline_never_clears_a_stage_folder_another_run_holds(tmp_path):
    stage = tmp_path / "mar"
    stage.mkdir()
    (stage / "last.pt").write_bytes(b"another run's checkpoint")
    holder = hold_lock_in_child(stage)
    try:
        with pytest.raises(ConfigError, match=f"stage folder: {stage} is in use by another marreid run"):
            clear_stage(stage)
        assert (stage / "last.pt").read_bytes() == b"another run's checkpoint"
    finally:
        stop_child(holder)
    clear_stage(stage)
    assert not stage.exists()


def test_msmt_list_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    listed = tmp_path / "list_train.txt"
    listed.write_bytes(b"0000/0000_001_01_0303morning_0015_0.jpg 0\n\xe9\n")
    with pytest.raises(DatasetError, match=r"list_train.txt: not UTF-8 text \(byte 0xe9 at offset 42, line 2\)"):
        read_list(listed, tmp_path)
