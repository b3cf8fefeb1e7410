"""Dataset readers: every layout, counts, labels, junk / distractors, every error."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from fakedata import make_folder_tree, make_market_tree, make_msmt_tree
from marreid.data import DATASET_FORMATS, ReidDataset, Sample, detect_format, load_dataset, pool_splits, relabel
from marreid.errors import ConfigError, DatasetError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FLAT_PATTERN = r"(?P<pid>\d+)_c(?P<cam>\d+)"


def labels(samples: list[Sample]) -> Counter:
    return Counter((s.pid, s.camid) for s in samples)


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (10, 200, 30)).save(path)
    return path


def test_market_labels_junk_and_distractors_nested_one_level(tmp_path):
    tree = make_market_tree(tmp_path / "Market-1501-v15.09.15", ids=4, cams=3, per_id=2, junk=3, distractors=2)
    (tmp_path / "Market-1501-v15.09.15" / "bounding_box_train" / "Thumbs.db").write_bytes(b"\0")
    ds = load_dataset("market1501", tmp_path)
    assert ds.name == "market1501"
    assert ds.root == str(tmp_path / "Market-1501-v15.09.15")
    for split in ("train", "query", "gallery"):
        assert labels(getattr(ds, split)) == Counter(tree.kept(split))
    assert ds.junk == 3
    assert all(s.pid != -1 for s in ds.gallery)
    assert sum(s.pid == 0 for s in ds.gallery) == 2
    # identity 1's first image is at camera (1 + 0) % 3 = 1, written as c2
    first = [s for s in ds.train if Path(s.path).name.startswith("0001_c2s1_")]
    assert [(s.pid, s.camid) for s in first] == [(1, 1)]
    assert all(Path(s.path).is_file() for s in ds.train + ds.query + ds.gallery)


def test_market_name_parsing_by_hand(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1, junk=0, distractors=0)
    for name in ("1501_c6s4_001877_00.jpg", "-1_c3s2_000101_04.jpg", "0000_c1s1_000151_01.jpg"):
        write_image(tmp_path / "bounding_box_test" / name)
    ds = load_dataset("market1501", tmp_path)
    by_name = {Path(s.path).name: (s.pid, s.camid) for s in ds.gallery}
    assert by_name["1501_c6s4_001877_00.jpg"] == (1501, 5)
    assert by_name["0000_c1s1_000151_01.jpg"] == (0, 0)
    assert "-1_c3s2_000101_04.jpg" not in by_name
    assert ds.junk == 1


def test_accepted_extensions_and_ignored_files(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1, junk=0, distractors=0)
    train = tmp_path / "bounding_box_train"
    for name in ("0009_c1s1_000001_00.png", "0009_c2s1_000002_00.jpeg", "0009_c1s1_000003_00.bmp", "0009_c2s1_000004_00.JPG"):
        write_image(train / name)
    (train / "Thumbs.db").write_bytes(b"\0\1")
    (train / "notes.txt").write_text("not an image")
    ds = load_dataset("market1501", tmp_path)
    assert sum(s.pid == 9 for s in ds.train) == 4
    assert len(ds.train) == 5


def test_dukemtmc_detected_and_read(tmp_path):
    tree = make_market_tree(tmp_path / "DukeMTMC-reID", style="duke", ids=3, cams=4, per_id=3, junk=0, distractors=0)
    assert detect_format(tmp_path) == "dukemtmc"
    ds = load_dataset(None, tmp_path)
    assert ds.name == "dukemtmc"
    for split in ("train", "query", "gallery"):
        assert labels(getattr(ds, split)) == Counter(tree.kept(split))
    assert ds.num_cams == 4


def test_duke_name_parsing_by_hand(tmp_path):
    make_market_tree(tmp_path, style="duke", ids=1, per_id=1, junk=0, distractors=0)
    write_image(tmp_path / "bounding_box_train" / "0001_c2_f0046182.jpg")
    ds = load_dataset("dukemtmc", tmp_path)
    assert ("0001_c2_f0046182.jpg", 1, 1) in {(Path(s.path).name, s.pid, s.camid) for s in ds.train}


@pytest.mark.parametrize("version", [1, 2])
def test_msmt17_lists_train_plus_val_and_cameras(tmp_path, version):
    tree = make_msmt_tree(tmp_path / "MSMT17", ids=3, cams=3, per_id=3, version=version)
    assert detect_format(tmp_path) == "msmt17"
    ds = load_dataset(None, tmp_path)
    assert ds.name == "msmt17"
    for split in ("train", "query", "gallery"):
        assert labels(getattr(ds, split)) == Counter(tree.kept(split))
    val_lines = (tmp_path / "MSMT17" / "list_val.txt").read_text().split()
    assert len(ds.train) == 3 * 3 and len(val_lines) == 2 * 3
    assert val_lines[0].rsplit("/", 1)[-1] in {Path(s.path).name for s in ds.train}


def test_msmt17_camera_and_pid_from_the_list_by_hand(tmp_path):
    make_msmt_tree(tmp_path, ids=1, cams=1, per_id=2)
    write_image(tmp_path / "test" / "0042" / "0042_003_14_0303noon_0007_1.jpg")
    with (tmp_path / "list_gallery.txt").open("a") as f:
        f.write("0042/0042_003_14_0303noon_0007_1.jpg 42\n")
    ds = load_dataset("msmt17", tmp_path)
    assert ds.gallery[-1].pid == 42 and ds.gallery[-1].camid == 13


@pytest.mark.parametrize(
    ("line", "needle"),
    [("0000/only_one_field.jpg", "list_query.txt:2"), ("0000/missing_000_01_x_0001_0.jpg 0", "not found"),
     ("0000/0000_001_xx_x_0001_0.jpg 0", "camera")],
)
def test_msmt17_bad_list_lines(tmp_path, line, needle):
    make_msmt_tree(tmp_path, ids=1, cams=1, per_id=2)
    if "xx" in line:
        write_image(tmp_path / "test" / line.split()[0])
    with (tmp_path / "list_query.txt").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(DatasetError, match=needle):
        load_dataset("msmt17", tmp_path)


def test_msmt17_missing_list_and_missing_test_folder(tmp_path):
    make_msmt_tree(tmp_path, ids=1, cams=1, per_id=2)
    (tmp_path / "list_gallery.txt").unlink()
    with pytest.raises(DatasetError, match="list_gallery.txt"):
        load_dataset("msmt17", tmp_path)
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(DatasetError, match=str(tmp_path / "test")):
        load_dataset("msmt17", tmp_path)


def test_cuhk03_variants(tmp_path):
    detected = make_market_tree(tmp_path / "cuhk03-np" / "detected", ids=3, per_id=2, junk=0, distractors=0, ext="png")
    labeled = make_market_tree(tmp_path / "cuhk03-np" / "labeled", ids=2, per_id=3, junk=0, distractors=0, ext="png")
    assert detect_format(tmp_path) == "cuhk03"
    for variant, tree in (("detected", detected), ("labeled", labeled)):
        ds = load_dataset("cuhk03", tmp_path, cuhk03_variant=variant)
        assert ds.name == "cuhk03"
        assert labels(ds.train) == Counter(tree.kept("train"))
        assert labels(ds.gallery) == Counter(tree.kept("gallery"))
    direct = load_dataset("cuhk03", tmp_path / "cuhk03-np" / "labeled")
    assert len(direct.train) == 2 * 3
    with pytest.raises(ConfigError, match="cuhk03_variant"):
        load_dataset("cuhk03", tmp_path, cuhk03_variant="both")


def test_cuhk03_missing_variant_names_it(tmp_path):
    make_market_tree(tmp_path / "detected", ids=1, per_id=1, junk=0, distractors=0)
    with pytest.raises(DatasetError, match="labeled"):
        load_dataset("cuhk03", tmp_path, cuhk03_variant="labeled")


@pytest.mark.parametrize("splits", [False, True])
@pytest.mark.parametrize(("form", "names"), [("identity", "int"), ("identity", "str"), ("flat", "int"), ("csv", "int")])
def test_folder_forms(tmp_path, form, names, splits):
    tree = make_folder_tree(tmp_path / "mine", ids=3, per_id=2, cams=2, form=form, names=names, splits=splits)
    assert detect_format(tree.root) == "folder"
    ds = load_dataset("folder", tree.root, pattern=FLAT_PATTERN if form == "flat" else None)
    assert ds.name == "folder"
    for split in ("train", "query", "gallery"):
        assert labels(getattr(ds, split)) == Counter(tree.kept(split))
    if not splits:
        assert ds.query == [] and ds.gallery == []


def test_folder_string_names_are_sorted_indices_by_hand(tmp_path):
    for name, count in (("carol", 1), ("alice", 2), ("bob", 3)):
        for k in range(count):
            write_image(tmp_path / name / f"{k}.jpg")
    ds = load_dataset("folder", tmp_path)
    assert Counter(s.pid for s in ds.train) == {0: 2, 1: 3, 2: 1}
    assert {s.camid for s in ds.train} == {0}


def test_folder_integer_names_are_the_pids(tmp_path):
    write_image(tmp_path / "0017" / "a.jpg")
    write_image(tmp_path / "3" / "b.jpg")
    assert sorted(s.pid for s in load_dataset("folder", tmp_path).train) == [3, 17]


def test_flat_pattern_without_cam_group_and_camera_renumbering(tmp_path):
    for name in ("0003_c5_a.jpg", "0003_c9_b.jpg", "0011_c5_c.jpg"):
        write_image(tmp_path / name)
    no_cam = load_dataset(None, tmp_path, pattern=r"(?P<pid>\d{4})_c\d")
    assert sorted((s.pid, s.camid) for s in no_cam.train) == [(3, 0), (3, 0), (11, 0)]
    with_cam = load_dataset(None, tmp_path, pattern=FLAT_PATTERN)
    # cameras 5 and 9 become 0 and 1 in sorted order
    assert sorted((s.pid, s.camid) for s in with_cam.train) == [(3, 0), (3, 1), (11, 0)]


def test_flat_pattern_errors(tmp_path):
    write_image(tmp_path / "0001_c1_a.jpg")
    write_image(tmp_path / "nobody.jpg")
    with pytest.raises(DatasetError, match="nobody.jpg"):
        load_dataset("folder", tmp_path, pattern=FLAT_PATTERN)
    with pytest.raises(ConfigError, match="pid"):
        load_dataset("folder", tmp_path, pattern=r"(\d+)_c")
    with pytest.raises(ConfigError, match="invalid --pattern"):
        load_dataset("folder", tmp_path, pattern=r"(?P<pid>\d+")
    with pytest.raises(DatasetError, match="--pattern"):
        load_dataset("folder", tmp_path)


def test_csv_manifest_paths_and_errors(tmp_path):
    img = write_image(tmp_path / "imgs" / "x.jpg")
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,pid,camid\n../imgs/x.jpg,5,2\n{img},6,0\n")
    ds = load_dataset(None, manifest)
    assert [(Path(s.path).resolve(), s.pid, s.camid) for s in ds.train] == [(img.resolve(), 5, 2), (img, 6, 0)]
    cases = [
        ("path,pid\nimgs/x.jpg,1\n", "camid"),
        ("path,pid,camid\n../imgs/x.jpg,one,0\n", "m.csv:2"),
        ("path,pid,camid\n../imgs/x.jpg,1,-1\n", "0-based"),
        ("path,pid,camid\n../imgs/gone.jpg,1,0\n", "gone.jpg"),
        ("path,pid,camid\n", "empty train"),
    ]
    for text, needle in cases:
        manifest.write_text(text)
        with pytest.raises(DatasetError, match=needle):
            load_dataset("folder", manifest)


def test_folder_split_needs_query_and_gallery_together(tmp_path):
    write_image(tmp_path / "train" / "0001" / "a.jpg")
    write_image(tmp_path / "query" / "0002" / "a.jpg")
    with pytest.raises(DatasetError, match="query and gallery"):
        load_dataset("folder", tmp_path)


def test_missing_folder_names_it(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1)
    shutil.rmtree(tmp_path / "query")
    with pytest.raises(DatasetError, match=f"missing folder {tmp_path / 'query'}"):
        load_dataset("market1501", tmp_path)


def test_unparseable_name_names_the_file(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1)
    bad = write_image(tmp_path / "bounding_box_train" / "person_one.jpg")
    with pytest.raises(DatasetError, match=str(bad)):
        load_dataset("market1501", tmp_path)


def test_camera_zero_is_unparseable(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1)
    bad = write_image(tmp_path / "query" / "0001_c0s1_000001_00.jpg")
    with pytest.raises(DatasetError, match=str(bad)):
        load_dataset("market1501", tmp_path)


@pytest.mark.parametrize("folder", ["bounding_box_train", "query", "bounding_box_test"])
def test_empty_split_names_the_folder(tmp_path, folder):
    make_market_tree(tmp_path, ids=1, per_id=1, junk=0, distractors=0)
    for f in (tmp_path / folder).iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=f"empty .* {tmp_path / folder}"):
        load_dataset("market1501", tmp_path)


def test_gallery_of_only_junk_is_empty(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1, junk=2, distractors=0)
    for f in (tmp_path / "bounding_box_test").glob("0*"):
        f.unlink()
    with pytest.raises(DatasetError, match="empty gallery"):
        load_dataset("market1501", tmp_path)


def test_junk_outside_gallery_is_an_error(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1)
    bad = write_image(tmp_path / "bounding_box_train" / "-1_c1s1_000001_00.jpg")
    with pytest.raises(DatasetError, match=str(bad)):
        load_dataset("market1501", tmp_path)


def test_unknown_format_lists_known_ones(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("viper", tmp_path)
    assert all(name in str(info.value) for name in DATASET_FORMATS)
    assert "\n" not in str(info.value)


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        load_dataset(None, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        load_dataset("market1501", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=str(tmp_path / "empty")):
        detect_format(tmp_path / "empty")


def test_pattern_only_for_folder_format(tmp_path):
    make_market_tree(tmp_path, ids=1, per_id=1)
    with pytest.raises(ConfigError, match="pattern"):
        load_dataset("market1501", tmp_path, pattern=FLAT_PATTERN)


def test_detect_format_ambiguous_parent(tmp_path):
    make_market_tree(tmp_path / "a", ids=1, per_id=1)
    make_market_tree(tmp_path / "b", ids=1, per_id=1, style="duke")
    with pytest.raises(DatasetError, match="several"):
        detect_format(tmp_path)
    assert detect_format(tmp_path / "b") == "dukemtmc"


def test_relabel_training_ids_keeps_evaluation_ids(tmp_path):
    samples = [Sample("a", 12, 0), Sample("b", 3, 1), Sample("c", 7, 0), Sample("d", 12, 2)]
    assert relabel(samples) == [Sample("a", 2, 0), Sample("b", 0, 1), Sample("c", 1, 0), Sample("d", 2, 2)]
    tree = make_market_tree(tmp_path, ids=3, per_id=1)
    ds = load_dataset("market1501", tmp_path)
    assert sorted({s.pid for s in ds.relabelled_train()}) == [0, 1, 2]
    assert {s.pid for s in ds.query} == {p for p, _ in tree.kept("query")} == {4, 5, 6}


def test_real_cuhk03_flat_copy_if_present():
    root = SHARED / "cuhk03-detected" / "images"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = load_dataset(None, root, pattern=r"(?P<pid>\d{4})_\d{2}")
    assert (len(ds.train), ds.num_train_pids) == (14_097, 1_467)


def test_real_market1501_if_present():
    root = SHARED / "Market-1501"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    ds = load_dataset(None, root)
    assert (len(ds.train), ds.num_train_pids, len(ds.query), len(ds.gallery), ds.junk) == (
        12_936, 751, 3_368, 19_732 - 3_819, 3_819)


def _pooling_dataset(zero_in_query: bool) -> ReidDataset:
    """Train ids 0 / 1 and 5, test ids 0, 3 and 7; a query of id 0 makes 0 a person (MSMT17)."""
    s = Sample
    first = 0 if zero_in_query else 1
    return ReidDataset(
        "x", "/x",
        train=[s("t0", first, 0), s("t1", 5, 1), s("t2", first, 1)],
        query=([s("q0", 0, 0)] if zero_in_query else []) + [s("q1", 3, 1)],
        gallery=[s("g0", 0, 1), s("g1", 3, 0), s("g2", 7, 1)],
    )


def test_pool_splits_keys_identities_by_train_or_test():
    # keys in sorted order: (test, 3) (test, 7) (train, 1) (train, 5); no query has id 0, so
    # gallery id 0 is a Market-style distractor crowd and is dropped.
    pooled = pool_splits(_pooling_dataset(zero_in_query=False), ["train", "query", "gallery"])
    assert [(x.path, x.pid, x.camid) for x in pooled] == [
        ("t0", 2, 0), ("t1", 3, 1), ("t2", 2, 1), ("q1", 0, 1), ("g1", 0, 0), ("g2", 1, 1)]


def test_pool_splits_zero_is_a_person_when_a_query_has_it():
    # MSMT17 restarts test ids at 0: (test, 0) is a person distinct from (train, 0).
    pooled = pool_splits(_pooling_dataset(zero_in_query=True), ["train", "query", "gallery"])
    assert {x.path: x.pid for x in pooled} == {"q0": 0, "g0": 0, "q1": 1, "g1": 1, "g2": 2, "t0": 3, "t2": 3, "t1": 4}


def test_pool_splits_in_the_order_given():
    ds = _pooling_dataset(zero_in_query=False)
    assert [x.pid for x in pool_splits(ds, ["train"])] == [0, 1, 0]
    assert [x.path for x in pool_splits(ds, ["gallery", "train"])] == ["g1", "g2", "t0", "t1", "t2"]
    with pytest.raises(ConfigError, match="validation"):
        pool_splits(ds, ["validation"])


def test_pool_splits_of_real_layouts(tmp_path):
    make_msmt_tree(tmp_path / "msmt", ids=3, cams=2, per_id=3)
    msmt = load_dataset("msmt17", tmp_path / "msmt")
    pooled = pool_splits(msmt, ["train", "query", "gallery"])
    # test ids 0-2 (1 query + 3 gallery each) become 0-2, train ids 0-2 (3 images each) 3-5
    assert len(pooled) == 21
    assert Counter(s.pid for s in pooled) == {0: 4, 1: 4, 2: 4, 3: 3, 4: 3, 5: 3}
    make_market_tree(tmp_path / "market", ids=4, per_id=2, junk=2, distractors=2)
    market = load_dataset("market1501", tmp_path / "market")
    pooled = pool_splits(market, ["train", "gallery"])
    # gallery ids 5-8 become 0-3, train ids 1-4 become 4-7; distractors dropped
    assert Counter(s.pid for s in pooled) == {k: 2 for k in range(8)}
    assert pool_splits(market, ["query"]) == relabel(market.query)
