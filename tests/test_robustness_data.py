"""Bad datasets and options through ``marreid train`` / ``pretrain``: one line naming the file or
option, exit status 2, before any training step; or, when asked, a run without the bad part."""

from __future__ import annotations

import pytest

from fakedata import make_market_tree
from marreid.data import ReidDataset, Sample
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.logging import read_log
from marreid.engine.preflight import check_evaluable, check_target_cameras
from marreid.errors import DatasetError
from test_robustness_helpers import AUX_IDS, TARGET_TRAIN, cli, copy_tree, first_image, make_run_data

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_run_data(tmp_path_factory.mktemp("robust_data"))


def damage(path, kind: str) -> None:
    """Corrupt bytes, a truncated JPEG, an empty file or text, under the image's own name."""
    original = path.read_bytes()
    content = {"corrupt": bytes(range(256)) * 4, "truncated": original[: len(original) // 2],
               "empty": b"", "text": b"id,camera\n1,2\n"}[kind]
    path.write_bytes(content)


@pytest.mark.parametrize("command, tree, split, kind", [
    ("train", "tgt", "train", "corrupt"),
    ("train", "aux", "train", "truncated"),
    ("train", "tgt", "gallery", "empty"),
    ("train", "tgt", "query", "text"),
    ("pretrain", "aux", "train", "corrupt"),
])
def test_unreadable_image_stops_before_training_naming_it(data, tmp_path, capsys, command, tree, split, kind):
    root = copy_tree(data[tree], tmp_path / tree)
    bad = first_image(root / SPLIT_FOLDERS[split])
    damage(bad, kind)
    what = f"{root} (auxiliary)" if tree == "aux" else f"{root} ({split})"
    run_dir = tmp_path / "run"
    key = {"aux": "data.aux_root", "tgt": "data.target_root"}[tree]
    code, err = cli(capsys, command, data["config"], "--run-dir", run_dir, "--set", f"{key}={root}")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid {command}: error: unreadable image in {what}: {bad} (")
    assert err[0].endswith("or pass --skip-bad-images (data.skip_bad_images=true) to train without it")
    assert not (run_dir / "last.pt").exists()


def test_skip_bad_images_trains_without_them_and_logs_the_count(data, tmp_path, capsys):
    aux = copy_tree(data["aux"], tmp_path / "aux")
    tgt = copy_tree(data["tgt"], tmp_path / "tgt")
    bad_aux = [first_image(aux / "bounding_box_train")]
    bad_tgt = sorted((tgt / "bounding_box_train").glob("*.jpg"))[3:5]
    for path, kind in zip(bad_aux + bad_tgt, ("truncated", "corrupt", "empty")):
        damage(path, kind)
    roots = ["--set", f"data.aux_root={aux}", "--set", f"data.target_root={tgt}", "--skip-bad-images"]

    code, err = cli(capsys, "pretrain", data["config"], "--run-dir", tmp_path / "pre", *roots)
    assert code == 0 and len(err) == 1
    assert err[0].startswith(f"skipping 1 unreadable image(s) of {aux} (auxiliary), e.g. {bad_aux[0]} (")
    (record,) = read_log(tmp_path / "pre" / "log.jsonl", "skipped_images")
    assert record["count"] == 1 and record["paths"] == {f"{aux} (auxiliary)": [str(bad_aux[0])]}

    code, err = cli(capsys, "train", data["config"], "--run-dir", tmp_path / "mar",
                    "--pretrained", tmp_path / "pre" / "last.pt", *roots)
    assert code == 0
    assert sum(line.startswith("skipping ") for line in err) == 2
    (record,) = read_log(tmp_path / "mar" / "log.jsonl", "skipped_images")
    assert record["count"] == 3
    assert record["per_split"] == {f"{aux} (auxiliary)": 1, f"{tgt} (train)": 2}
    assert record["paths"][f"{tgt} (train)"] == [str(p) for p in bad_tgt]
    saved = load_checkpoint(tmp_path / "mar" / "last.pt")
    assert saved["num_target"] == TARGET_TRAIN - 2 and saved["num_agents"] == AUX_IDS


def test_without_the_scan_a_bad_image_is_one_line_when_read(data, tmp_path, capsys):
    tgt = copy_tree(data["tgt"], tmp_path / "tgt")
    bad = first_image(tgt / "bounding_box_train")
    damage(bad, "corrupt")
    code, err = cli(capsys, "train", data["config"], "--run-dir", tmp_path / "run", "--set", f"data.target_root={tgt}",
                    "--set", "data.verify_images=false")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid train: error: cannot read image {bad}: ")


def _remove_query(tgt):
    for path in (tgt / "query").iterdir():
        path.unlink()


def _unparseable_name(tgt):
    (tgt / "bounding_box_train" / "person.jpg").write_bytes(first_image(tgt / "bounding_box_train").read_bytes())


@pytest.mark.parametrize("case", ["missing root", "wrong layout", "unparseable name", "empty split"])
def test_dataset_problems_are_one_line_naming_the_path(data, tmp_path, capsys, case):
    tgt = tmp_path / "tgt"
    if case == "wrong layout":
        (tgt / "images").mkdir(parents=True)
    elif case != "missing root":
        copy_tree(data["tgt"], tgt)
        {"unparseable name": _unparseable_name, "empty split": _remove_query}[case](tgt)
    expected = {
        "missing root": f"dataset root not found: {tgt}",
        "wrong layout": f"missing folder {tgt / 'bounding_box_train'}",
        "unparseable name": "cannot parse identity and camera (PID_cCAM...) from "
                            f"{tgt / 'bounding_box_train' / 'person.jpg'}",
        "empty split": f"empty query split: no images in {tgt / 'query'}",
    }[case]
    code, err = cli(capsys, "train", data["config"], "--run-dir", tmp_path / "run", "--set", f"data.target_root={tgt}")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid train: error: {expected}")


def test_single_camera_target_is_refused_unless_cml_is_off(data, tmp_path, capsys):
    tgt = copy_tree(data["tgt"], tmp_path / "tgt")
    for path in (tgt / "bounding_box_train").glob("*.jpg"):
        path.rename(path.with_name(path.name.replace("_c2s1", "_c1s1").replace("_c3s1", "_c1s1")))
    args = ["train", data["config"], "--set", f"data.target_root={tgt}"]
    code, err = cli(capsys, *args, "--run-dir", tmp_path / "refused")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid train: error: {tgt}: the target's training images come from 1 camera(s)")
    assert "set mar.use_cml=false to train without it" in err[0]
    assert not (tmp_path / "refused" / "last.pt").exists()

    code, err = cli(capsys, *args, "--run-dir", tmp_path / "no_cml", "--set", "mar.use_cml=false")
    assert code == 0
    steps = read_log(tmp_path / "no_cml" / "log.jsonl", "step")
    assert len(steps) == 2 and all(r["cml"] == 0 for r in steps)


def test_target_that_cannot_be_evaluated_is_refused_before_training(data, tmp_path, capsys):
    tgt = copy_tree(data["tgt"], tmp_path / "tgt")
    for path in (tgt / "bounding_box_test").glob("*.jpg"):
        if not path.name.startswith(("0000_", "-1_")):  # keep only distractors and junk
            path.unlink()
    code, err = cli(capsys, "train", data["config"], "--run-dir", tmp_path / "run", "--set", f"data.target_root={tgt}")
    assert code == 2 and err == [f"marreid train: error: {tgt}: no query has a gallery image of its identity from "
                                 f"another camera, so the run could not be evaluated"]


def test_auxiliary_with_fewer_identities_than_the_agents(data, tmp_path, capsys):
    make_market_tree(tmp_path / "aux3", ids=AUX_IDS - 1, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    code, err = cli(capsys, "train", data["config"], "--run-dir", tmp_path / "run",
                    "--set", f"data.aux_root={tmp_path / 'aux3'}", "--set", "train.aux_batch=4")
    assert code == 2 and len(err) == 1
    assert f"{data['pre'] / 'last.pt'}: {AUX_IDS} agents, but the auxiliary set has {AUX_IDS - 1} identities" in err[0]


@pytest.mark.parametrize("command, option, message", [
    ("train", "data.height=0", "data.height: must be > 0, got 0"),
    ("train", "data.width=-8", "data.width: must be > 0, got -8"),
    ("pretrain", "pretrain.batch_size=1", "pretrain.batch_size: BatchNorm needs at least 2 images per batch, got 1"),
])
def test_impossible_sizes_name_the_option(data, tmp_path, capsys, command, option, message):
    code, err = cli(capsys, command, data["config"], "--run-dir", tmp_path, "--set", option)
    assert (code, err) == (2, [f"marreid {command}: error: {message}"])


def test_camera_rule_counts_cameras_with_two_images():
    # Camera 0 has three images, camera 1 one: only one camera has per-camera statistics.
    samples = [Sample(f"{i}.jpg", 1, 0) for i in range(3)] + [Sample("x.jpg", 2, 1)]
    with pytest.raises(DatasetError, match="1 camera"):
        check_target_cameras(samples, use_cml=True, where="t")
    check_target_cameras(samples, use_cml=False, where="t")
    check_target_cameras(samples + [Sample("y.jpg", 2, 1)], use_cml=True, where="t")


def test_evaluable_needs_a_same_identity_match_on_another_camera():
    query = [Sample("q1.jpg", 1, 0), Sample("q2.jpg", 2, 1)]
    same_camera = [Sample("g1.jpg", 1, 0), Sample("g2.jpg", 2, 1), Sample("g0.jpg", 0, 2)]
    with pytest.raises(DatasetError, match="no query"):
        check_evaluable(ReidDataset("t", "t", [], query, same_camera))
    check_evaluable(ReidDataset("t", "t", [], query, same_camera + [Sample("g3.jpg", 2, 2)]))
    with pytest.raises(DatasetError, match="no query / gallery"):
        check_evaluable(ReidDataset("t", "t", [], query, []))
