"""``marreid analyze lognormal``, ``visualize ranks`` and ``search`` in-process on a tiny generated
dataset, checked against features computed here image by image."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fakedata import make_market_tree
from marreid.analysis.plotting import GridLayout
from marreid.analysis.ranklist import FRAME_COLOURS
from marreid.cli import main
from marreid.config import config_from_dict, config_to_dict
from marreid.data import load_dataset
from marreid.data.transforms import TestTransform
from marreid.engine.checkpoint import save_checkpoint
from marreid.models import build_model

HEIGHT, WIDTH = 32, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Market-style tree and a checkpoint of a randomly initialised tiny model with 4 agents."""
    root = tmp_path_factory.mktemp("analysis_cli")
    make_market_tree(root / "tgt", ids=4, cams=3, per_id=3, size=(HEIGHT, WIDTH), seed=5)
    cfg = config_from_dict({"data": {"target_format": "market1501", "target_root": str(root / "tgt"),
                                     "height": HEIGHT, "width": WIDTH, "num_workers": 0},
                            "model": {"arch": "tiny"}, "train": {"device": "cpu"}, "eval": {"batch_size": 7}})
    torch.manual_seed(0)
    model = build_model("tiny", 4, scale=30.0).eval()
    ckpt = root / "run" / "last.pt"
    save_checkpoint(ckpt, {"kind": "mar", "arch": "tiny", "num_agents": 4, "config": config_to_dict(cfg),
                           "model": model.state_dict()})
    return {"root": root, "ckpt": ckpt, "model": model, "dataset": load_dataset("market1501", root / "tgt")}


@torch.no_grad()
def forward(model, paths) -> tuple[np.ndarray, np.ndarray]:
    """(features, log soft multilabels) of each image, one at a time."""
    transform = TestTransform(HEIGHT, WIDTH)
    feats, logs = [], []
    for path in paths:
        feat, logits = model(transform(Image.open(path).convert("RGB"))[None])
        feats.append(feat[0].double().numpy())
        logs.append(torch.log_softmax(logits[0].double(), 0).numpy())
    return np.array(feats), np.array(logs)


def cosine_order(q: np.ndarray, gallery: np.ndarray) -> list[tuple[float, int]]:
    return sorted((1.0 - float(q @ g) / (np.linalg.norm(q) * np.linalg.norm(g)), j) for j, g in enumerate(gallery))


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_lognormal_fits_equal_numpy_on_the_models_log_multilabels(setup, tmp_path, capsys) -> None:
    out = tmp_path / "ln"
    assert main(["analyze", "lognormal", str(setup["ckpt"]), "--dataset", str(setup["root"] / "tgt"),
                 "--dim", "1", "--bins", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dimension 1" in printed and str(out / "lognormal.png") in printed
    _, log_y = forward(setup["model"], [s.path for s in setup["dataset"].train])
    report = json.loads((out / "lognormal.json").read_text())
    assert report["num_images"] == 12 and report["num_agents"] == 4 and report["split"] == "train"
    for panel, values in (("all dimensions", log_y.ravel()), ("dimension 1", log_y[:, 1])):
        assert report["fits"][panel]["n"] == values.size
        assert report["fits"][panel]["mean"] == pytest.approx(np.mean(values), rel=1e-4)
        assert report["fits"][panel]["std"] == pytest.approx(np.std(values), rel=1e-4)
    with Image.open(out / "lognormal.png") as img:
        assert img.size == (1200, 450)
    assert len(read_csv(out / "lognormal.csv")) == 24


def test_lognormal_defaults_to_the_checkpoint_folder_and_refuses_foreign_weights(setup, tmp_path, capsys) -> None:
    assert main(["analyze", "lognormal", str(setup["ckpt"]), "--bins", "5"]) == 0
    assert (setup["ckpt"].parent / "lognormal.json").stat().st_size > 0
    foreign = tmp_path / "weights.pt"
    torch.save(setup["model"].state_dict(), foreign)
    capsys.readouterr()
    assert main(["analyze", "lognormal", str(foreign), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "configuration file not found" in capsys.readouterr().err
    assert main(["analyze", "lognormal", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a marreid checkpoint" in err and len(err.splitlines()) == 1


def test_ranked_list_grid_matches_brute_force_and_protocol(setup, tmp_path, capsys) -> None:
    out = tmp_path / "ranks"
    assert main(["visualize", "ranks", str(setup["ckpt"]), "--query-index", "3", "0", "--topk", "6",
                 "--tile", "32", "16", "--out", str(out)]) == 0
    assert str(out / "ranks.png") in capsys.readouterr().out
    query, gallery = setup["dataset"].query, setup["dataset"].gallery
    qf, _ = forward(setup["model"], [query[3].path, query[0].path])
    gf, _ = forward(setup["model"], [g.path for g in gallery])
    rows = read_csv(out / "ranks.csv")
    assert len(rows) == 12
    layout = GridLayout(rows=2, cols=6, tile_h=32, tile_w=16)
    with Image.open(out / "ranks.png") as img:
        assert img.size == (layout.size()[1], layout.size()[0])
        pixels = np.asarray(img.convert("RGB"))
    for r, (qi, q) in enumerate(zip((3, 0), qf)):
        mine = [row for row in rows if int(row["query_index"]) == qi]
        want = cosine_order(q, gf)[:6]
        assert [int(row["gallery_index"]) for row in mine] == [j for _, j in want]
        np.testing.assert_allclose([float(row["distance"]) for row in mine], [d for d, _ in want], atol=1e-5)
        for col, row in enumerate(mine, start=1):
            g = gallery[int(row["gallery_index"])]
            if g.pid == query[qi].pid:
                status = "same camera" if g.camid == query[qi].camid else "match"
            else:
                status = "junk" if g.pid == -1 else "false"
            assert row["status"] == status
            y, x = layout.origin(r, col)
            assert tuple(pixels[y + 1, x + 1]) == FRAME_COLOURS[status]


def test_random_queries_and_bad_index(setup, tmp_path, capsys) -> None:
    assert main(["visualize", "ranks", str(setup["ckpt"]), "--queries", "2", "--topk", "3",
                 "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "ranks.csv")
    assert len({row["query_index"] for row in rows}) == 2 and len(rows) == 6
    capsys.readouterr()
    assert main(["visualize", "ranks", str(setup["ckpt"]), "--query-index", "99", "--out", str(tmp_path)]) == 2
    assert "--query-index 99" in capsys.readouterr().err


def test_search_a_folder_then_reuse_its_cache(setup, tmp_path, capsys) -> None:
    gallery_dir = setup["root"] / "tgt" / "bounding_box_test"
    queries = [s.path for s in setup["dataset"].query[:2]]
    argv = ["search", *queries, "--gallery", str(gallery_dir), "--checkpoint", str(setup["ckpt"]),
            "--topk", "4", "--tile", "32", "16", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    cached = [p for p in tmp_path.iterdir() if p.name.startswith("gallery_bounding_box_test_")]
    assert len(cached) == 1 and f"features cached at {cached[0]}" in printed
    paths = sorted(str(p) for p in gallery_dir.iterdir())
    qf, _ = forward(setup["model"], queries)
    gf, _ = forward(setup["model"], paths)
    rows = read_csv(tmp_path / "search.csv")
    for query, q in zip(queries, qf):
        mine = [row for row in rows if row["query_path"] == query]
        want = cosine_order(q, gf)[:4]
        assert [row["gallery_path"] for row in mine] == [paths[j] for _, j in want]
        np.testing.assert_allclose([float(row["distance"]) for row in mine], [d for d, _ in want], atol=1e-5)
    layout = GridLayout(rows=2, cols=4, tile_h=32, tile_w=16)
    with Image.open(tmp_path / "search.png") as img:
        assert img.size == (layout.size()[1], layout.size()[0])

    stamp = cached[0].stat().st_mtime_ns
    assert main(argv) == 0
    assert f"reused from the cache {cached[0]}" in capsys.readouterr().out
    assert cached[0].stat().st_mtime_ns == stamp
    os.utime(paths[0], ns=(1, 1))
    assert main(argv) == 0
    assert "features cached at" in capsys.readouterr().out


def test_search_uses_precomputed_features_as_they_are(setup, tmp_path, capsys) -> None:
    paths = [s.path for s in setup["dataset"].gallery]
    feats = np.random.default_rng(7).standard_normal((len(paths), 32)).astype(np.float32)
    np.savez(tmp_path / "feats.npz", feats=feats, paths=np.array(paths))
    query = setup["dataset"].query[1].path
    assert main(["search", query, "--gallery", str(tmp_path / "feats.npz"), "--checkpoint", str(setup["ckpt"]),
                 "--topk", "5", "--out", str(tmp_path)]) == 0
    assert "precomputed features" in capsys.readouterr().out
    qf, _ = forward(setup["model"], [query])
    want = cosine_order(qf[0], feats)[:5]
    rows = read_csv(tmp_path / "search.csv")
    assert [int(row["gallery_index"]) for row in rows] == [j for _, j in want]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gallery_")]

    np.savez(tmp_path / "other.npz", feats=feats[:, :5], paths=np.array(paths))
    assert main(["search", query, "--gallery", str(tmp_path / "other.npz"), "--checkpoint", str(setup["ckpt"])]) == 2
    assert "dimension 5" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nope.jpg"), "--gallery", str(tmp_path / "feats.npz"),
                 "--checkpoint", str(setup["ckpt"])]) == 2
    assert "query image not found" in capsys.readouterr().err
