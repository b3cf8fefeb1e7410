"""The synthetic multi-camera dataset: layout, names, identities, determinism, camera look."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marreid.cli import main
from marreid.data.synthetic import (
    Camera,
    SyntheticConfig,
    apply_camera,
    draw_cameras,
    generate,
    read_params,
)
from marreid.errors import ConfigError, DatasetError

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")

TINY = SyntheticConfig(
    aux_ids=10, aux_test_ids=3, aux_cams=4, target_train_ids=10, target_test_ids=4, target_cams=4,
    per_cam=2, queries_per_id=2, distractors=5, image_size=(32, 16), seed=3, target_outdoor=0.5,
)


def _records(root: Path, domain: str, split: str) -> list[tuple[Path, int, int]]:
    """(path, pid, 1-based camera) of every file, asserting each name is Market-style."""
    out = []
    for path in sorted((root / domain / split).iterdir()):
        match = MARKET_NAME.match(path.name)
        assert match, f"{path.name} is not a Market-1501 name"
        out.append((path, int(match[1]), int(match[2])))
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "out"
    return root, generate(root, TINY)


def test_layout_names_and_counts_follow_config(tiny):
    root, summary = tiny
    c = TINY
    for domain, train_ids, test_ids, cams in (
        ("auxiliary", c.aux_ids, c.aux_test_ids, c.aux_cams),
        ("target", c.target_train_ids, c.target_test_ids, c.target_cams),
    ):
        train = _records(root, domain, "bounding_box_train")
        query = _records(root, domain, "query")
        gallery = _records(root, domain, "bounding_box_test")
        extra = c.distractors if domain == "target" else 0
        assert len(train) == train_ids * cams * c.per_cam
        assert len(query) == test_ids * c.queries_per_id
        assert len(gallery) == test_ids * cams * c.per_cam - len(query) + extra
        # Every training identity is seen per_cam times by every camera.
        per_pid_cam = Counter((pid, cam) for _, pid, cam in train)
        assert set(per_pid_cam.values()) == {c.per_cam}
        assert len(per_pid_cam) == train_ids * cams
        assert {cam for _, _, cam in train + query + gallery} == set(range(1, cams + 1))
        for split, records in zip(SPLITS, (train, query, gallery)):
            assert summary[domain][split]["images"] == len(records)
            assert summary[domain][split]["ids"] == len({pid for _, pid, _ in records})
        assert summary[domain]["cameras"] == cams
        with Image.open(train[0][0]) as image:
            assert image.size == (c.image_size[1], c.image_size[0])
            assert image.mode == "RGB"


def test_identity_sets_are_disjoint_and_distractors_only_in_target_gallery(tiny):
    root, _ = tiny
    ids = {}
    for domain in ("auxiliary", "target"):
        ids[domain, "train"] = {pid for _, pid, _ in _records(root, domain, "bounding_box_train")}
        query = {pid for _, pid, _ in _records(root, domain, "query")}
        gallery = Counter(pid for _, pid, _ in _records(root, domain, "bounding_box_test"))
        assert set(gallery) - {0} == query
        ids[domain, "test"] = query
    assert Counter(pid for _, pid, _ in _records(root, "target", "bounding_box_test"))[0] == TINY.distractors
    assert 0 not in {pid for _, pid, _ in _records(root, "auxiliary", "bounding_box_test")}
    sets = list(ids.values())
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    assert all(0 not in s and -1 not in s for s in sets)


def _assert_cross_camera_matches(root: Path) -> int:
    checked = 0
    for domain in ("auxiliary", "target"):
        gallery = {(pid, cam) for _, pid, cam in _records(root, domain, "bounding_box_test")}
        for _, pid, cam in _records(root, domain, "query"):
            assert any(g_pid == pid and g_cam != cam for g_pid, g_cam in gallery), (domain, pid, cam)
            checked += 1
    return checked


def test_every_query_has_a_gallery_match_in_another_camera(tiny):
    assert _assert_cross_camera_matches(tiny[0]) == (TINY.aux_test_ids + TINY.target_test_ids) * 2


def test_single_image_per_camera_still_leaves_a_cross_camera_match(tmp_path):
    config = SyntheticConfig(aux_ids=1, aux_test_ids=3, aux_cams=2, target_train_ids=1, target_test_ids=3,
                             target_cams=2, per_cam=1, queries_per_id=5, distractors=0, image_size=(32, 16))
    generate(tmp_path / "out", config)
    # With one image per camera, at most cams - 1 of them can be queries.
    assert len(_records(tmp_path / "out", "target", "query")) == 3
    assert _assert_cross_camera_matches(tmp_path / "out") == 6


def test_params_json_round_trips_config_and_records_cameras(tiny):
    root, summary = tiny
    params = read_params(root)
    assert params["config"] == TINY
    assert params["seed"] == TINY.seed and params["complete"] is True
    camera_keys = {f.name for f in fields(Camera)}
    for domain, cams in (("auxiliary", TINY.aux_cams), ("target", TINY.target_cams)):
        cameras = params["domains"][domain]["cameras"]
        assert len(cameras) == cams
        assert all(set(cam) == camera_keys for cam in cameras)
        # Auxiliary cameras are all indoor; half of the 4 target cameras film outdoors.
        outdoor = sum(cam["scene"] == "outdoor" for cam in cameras)
        assert outdoor == (0 if domain == "auxiliary" else 2)
        assert params["counts"][domain] == {s: summary[domain][s] for s in SPLITS}
    raw = json.loads((root / "params.json").read_text())
    assert SyntheticConfig.from_dict(raw["config"]) == TINY


def test_same_seed_is_byte_identical_and_another_seed_differs(tiny, tmp_path):
    root, _ = tiny
    generate(tmp_path / "again", TINY)
    assert _tree_bytes(tmp_path / "again") == _tree_bytes(root)

    other = SyntheticConfig(**{**TINY.to_dict(), "seed": TINY.seed + 1})
    generate(tmp_path / "other", other)
    digests = {hashlib.sha256(b).hexdigest() for n, b in _tree_bytes(root).items() if n.endswith(".jpg")}
    other_digests = {hashlib.sha256(b).hexdigest()
                     for n, b in _tree_bytes(tmp_path / "other").items() if n.endswith(".jpg")}
    assert len(other_digests) == len(digests)
    assert not digests & other_digests


def test_refuses_folders_it_did_not_make(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match="foreign"):
            generate(foreign, TINY, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        generate(a_file, TINY)


def test_overwrite_is_needed_to_replace_its_own_output(tmp_path):
    out = tmp_path / "out"
    generate(out, TINY)
    with pytest.raises(DatasetError, match="--overwrite"):
        generate(out, TINY)
    smaller = SyntheticConfig(**{**TINY.to_dict(), "aux_ids": 2, "distractors": 0})
    generate(out, smaller, overwrite=True)
    assert len(_records(out, "auxiliary", "bounding_box_train")) == 2 * TINY.aux_cams * TINY.per_cam
    assert len(_records(out, "target", "bounding_box_test")) == (
        TINY.target_test_ids * (TINY.target_cams * TINY.per_cam - TINY.queries_per_id))
    assert read_params(out)["config"] == smaller


@pytest.mark.parametrize("change, option", [
    ({"per_cam": 0}, "per_cam"),
    ({"target_cams": 10}, "target_cams"),
    ({"aux_cams": 1}, "aux_cams"),
    ({"image_size": (8, 4)}, "image_size"),
    ({"occlusion": 1.5}, "occlusion"),
    ({"target_outdoor": -0.1}, "target_outdoor"),
    ({"distractors": 10_001}, "distractors"),
    ({"seed": -1}, "seed"),
    ({"aux_ids": 9000, "target_train_ids": 1000}, "target_test_ids"),
])
def test_bad_config_values_raise_config_error_naming_them(change, option):
    with pytest.raises(ConfigError, match=option):
        SyntheticConfig(**change)


def test_scenes_and_viewpoints_are_dealt_as_configured():
    rng = np.random.default_rng(0)
    cameras = draw_cameras(rng, shift=1.0, count=4, outdoor=0.5)
    assert sorted(c.scene for c in cameras) == ["indoor", "indoor", "outdoor", "outdoor"]
    # round(0.35 * 4) = 1 camera sees people mostly from the back.
    assert sorted(c.view for c in cameras) == ["back", "front", "front", "front"]
    assert all(c.scene == "indoor" for c in draw_cameras(rng, shift=1.0, count=5, outdoor=0.0))


def test_zero_shift_gives_neutral_photometry():
    for camera in draw_cameras(np.random.default_rng(1), shift=0.0, count=3, outdoor=1.0):
        assert camera.gain == (1.0, 1.0, 1.0)
        assert (camera.brightness, camera.contrast, camera.gamma, camera.blur) == (0.0, 1.0, 1.0, 0.0)
        assert (camera.noise, camera.resolution) == (1.0, 1.0)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="colour"):
        SyntheticConfig.from_dict({"aux_ids": 3, "colour": 1})


def test_apply_camera_follows_its_equation():
    neutral = dict(brightness=0.0, contrast=1.0, gamma=1.0, blur=0.0, noise=0.0, resolution=1.0,
                   scene="indoor", view="front", mirror=0.0, wall=(0, 0, 0), floor=(0, 0, 0), horizon=0.5,
                   texture="tiles", clutter=())
    image = np.full((4, 2, 3), 102, dtype=np.uint8)
    rng = np.random.default_rng(0)

    cast = Camera(gain=(2.0, 1.0, 0.5), **neutral)
    assert apply_camera(image, cast, rng)[0, 0].tolist() == [204, 102, 51]

    x = 102 / 255
    curve = Camera(gain=(1.0, 1.0, 1.5), **{**neutral, "gamma": 2.0, "contrast": 1.5, "brightness": 0.1})
    y = ((x ** 2.0 - 0.5) * 1.5 + 0.5 + 0.1) * np.array([1.0, 1.0, 1.5])
    expected = [int(round(min(max(v, 0.0), 1.0) * 255)) for v in y]
    assert apply_camera(image, curve, rng)[0, 0].tolist() == expected


def _train_images(root: Path, domain: str) -> tuple[list[np.ndarray], list[int], list[int]]:
    records = _records(root, domain, "bounding_box_train")
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p, _, _ in records]
    return images, [pid for _, pid, _ in records], [cam for _, _, cam in records]


@pytest.mark.parametrize("domain", ["auxiliary", "target"])
def test_camera_explains_much_of_the_mean_colour_variance(tiny, domain):
    images, _, cams = _train_images(tiny[0], domain)
    means = [img.reshape(-1, 3).mean(axis=0) for img in images]
    grand = sum(means) / len(means)
    total = sum(float(((m - grand) ** 2).sum()) for m in means)
    between = 0.0
    for cam in set(cams):
        members = [m for m, c in zip(means, cams) if c == cam]
        cam_mean = sum(members) / len(members)
        between += len(members) * float(((cam_mean - grand) ** 2).sum())
    assert between / total > 0.25


def _torso_histogram(image: np.ndarray) -> np.ndarray:
    """Normalised 4x4x4 RGB histogram of the chest region."""
    h, w, _ = image.shape
    hist = np.zeros(64)
    for r, g, b in image[int(h * 0.3):int(h * 0.5), int(w * 0.3):int(w * 0.7)].reshape(-1, 3):
        hist[int(r) // 64 * 16 + int(g) // 64 * 4 + int(b) // 64] += 1
    return hist / hist.sum()


@pytest.mark.parametrize("domain", ["auxiliary", "target"])
def test_same_identity_is_closer_than_other_identities(tiny, domain):
    images, pids, cams = _train_images(tiny[0], domain)
    hists = [_torso_histogram(img) for img in images]
    pairs: dict[tuple[bool, bool], list[float]] = {(s, c): [] for s in (True, False) for c in (True, False)}
    for i in range(len(hists)):
        for j in range(i + 1, len(hists)):
            distance = float(np.abs(hists[i] - hists[j]).sum())
            pairs[pids[i] == pids[j], cams[i] == cams[j]].append(distance)
    mean = {key: sum(v) / len(v) for key, v in pairs.items()}
    assert mean[True, True] < 0.6 * mean[False, True]
    # Identity survives the camera change, though less clearly.
    assert mean[True, False] < 0.93 * mean[False, False]
    hits = 0
    for i in range(len(hists)):
        others = [j for j in range(len(hists)) if cams[j] != cams[i]]
        nearest = min(others, key=lambda j: float(np.abs(hists[i] - hists[j]).sum()))
        hits += pids[nearest] == pids[i]
    # Chance is 1 / (number of identities) = 0.1 here.
    assert hits / len(hists) > 0.25


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synth", str(out), "--seed", "5", "--aux-ids", "2", "--aux-test-ids", "2", "--aux-cams", "2",
            "--target-ids", "3", "--test-ids", "2", "--cams", "3", "--per-cam", "1", "--distractors", "1",
            "--size", "32x16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "bounding_box_train 9 images / 3 ids" in printed
    config = read_params(out)["config"]
    assert (config.seed, config.target_cams, config.image_size) == (5, 3, (32, 16))
    assert len(_records(out, "auxiliary", "bounding_box_train")) == 4

    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_rejects_malformed_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path / "x"), "--size", "64by32"])
    assert exc.value.code == 2
    assert "--size" in capsys.readouterr().err
