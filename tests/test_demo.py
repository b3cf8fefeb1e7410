"""``marreid demo`` and ``marreid experiment`` end to end, in-process, on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fakedata import make_market_tree
from marreid.cli import build_parser, main
from marreid.cli.demo_cmd import default_config_path, read_demo_config, shipped_settings
from marreid.config import config_from_dict
from marreid.data.synthetic import SyntheticConfig
from marreid.engine.logging import read_log

TINY_DEMO = {
    "synthetic": {"aux_ids": 6, "aux_test_ids": 2, "aux_cams": 2, "target_train_ids": 6, "target_test_ids": 3,
                  "target_cams": 3, "per_cam": 2, "distractors": 2, "image_size": [32, 16]},
    "data": {"aux_format": "market1501", "target_format": "market1501", "height": 32, "width": 16, "pad": 2,
             "num_workers": 0},
    "model": {"arch": "tiny"},
    "pretrain": {"epochs": 1, "batch_size": 8, "lr": 0.05},
    "optim": {"epochs": 2, "lr": 0.01},
    "mar": {"mining_ratio": 0.1},
    "train": {"aux_batch": 8, "target_batch": 8, "device": "cpu", "progress": False},
}


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and "---" not in line:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump(TINY_DEMO))
    run_dir = root / "run"
    threads = torch.get_num_threads()
    assert main(["demo", "--config", str(config), "--run-dir", str(run_dir), "--seeds", "2", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread count does not outlive it
    return config, run_dir


def test_seeds_get_their_own_data_and_training_seed(demo):
    _, run_dir = demo
    for seed in (0, 1):
        params = json.loads((run_dir / "data" / f"seed_{seed}" / "params.json").read_text())
        assert params["seed"] == seed and params["complete"]
        saved = yaml.safe_load((run_dir / f"seed_{seed}" / "mar" / "mar" / "config.yaml").read_text())
        assert saved["train"]["seed"] == seed
        assert saved["data"]["target_root"] == str((run_dir / "data" / f"seed_{seed}" / "target").absolute())
    first, second = (sorted(p.name for p in (run_dir / "data" / f"seed_{s}" / "target" / "query").iterdir())
                     for s in (0, 1))
    assert first != second  # another data seed draws other frames


def test_seed_summary_is_the_mean_and_sample_std_of_the_seeds(demo):
    _, run_dir = demo
    report = json.loads((run_dir / "results.json").read_text())
    assert report["seeds"] == [0, 1] and report["variants"] == ["mar"]
    assert report["threads"] == 1 and "expected" not in report  # --config: not the shipped settings
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu"]
    per_seed = [json.loads((run_dir / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    for row, pick in (("direct", lambda r: r["direct"]), ("mar", lambda r: r["variants"]["mar"])):
        for rule in ("plain", "mar-release"):
            for key in ("rank1", "rank5", "rank10", "mAP"):
                values = np.array([pick(r)["metrics"][rule][key] for r in per_seed])
                stat = report["summary"][row][rule][key]
                assert stat["mean"] == pytest.approx(values.mean())
                assert stat["std"] == pytest.approx(values.std(ddof=1))
    rows = table_rows((run_dir / "results.md").read_text())
    direct = report["summary"]["direct"]["plain"]["mAP"]
    assert rows["direct transfer"][3] == f"{100 * direct['mean']:.1f} ± {100 * direct['std']:.1f}"
    assert set(rows) == {"method", "direct transfer", "MAR (all losses)"}


def test_ablation_reuses_the_pretrained_model_and_adds_the_variants(demo, capsys):
    config, run_dir = demo
    seed_dir = run_dir / "seed_0"
    logged = len(read_log(seed_dir / "stages.jsonl"))
    assert main(["demo", "ablation", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "reused" in err
    decisions = [(r["stage"], r["event"]) for r in read_log(seed_dir / "stages.jsonl")[logged:]]
    assert decisions[:3] == [("pretrain", "skip"), ("direct", "skip"), ("mar/mar", "skip")]
    for name in ("no_cml", "no_mdl", "no_rj", "hard_labels"):
        assert (f"mar/{name}", "done") in decisions
    rows = table_rows(out)
    assert set(rows) == {"method", "direct transfer", "MAR (all losses)", "MAR without L_CML",
                         "MAR without L_MDL", "MAR without L_RJ", "MAR with hard labels"}
    assert (run_dir / "results.md").read_text() in out


def test_changed_generator_settings_regenerate_the_data_and_rerun_the_stages(demo, tmp_path):
    config, run_dir = demo
    assert main(["demo", "--config", str(config), "--run-dir", str(tmp_path), "--set",
                 "synthetic.per_cam=3"]) == 0
    params = json.loads((tmp_path / "data" / "seed_0" / "params.json").read_text())
    assert params["config"]["per_cam"] == 3
    logged = len(read_log(tmp_path / "seed_0" / "stages.jsonl"))
    assert main(["demo", "--config", str(config), "--run-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "data" / "seed_0" / "params.json").read_text())["config"]["per_cam"] == 2
    decisions = [(r["stage"], r["event"]) for r in read_log(tmp_path / "seed_0" / "stages.jsonl")[logged:]]
    assert ("pretrain", "skip") not in decisions and ("pretrain", "restart") in decisions


@pytest.mark.parametrize("change, message", [
    ({"synthetic": {"seed": 3}}, "synthetic.seed is set by --seeds"),
    ({"synthetic": {"per_camera": 3}}, "unknown key(s) per_camera"),
    ({"optim": {"lrr": 0.1}}, "unknown configuration key 'optim.lrr'"),
])
def test_bad_demo_settings_are_one_line_errors(tmp_path, capsys, change, message):
    settings = {**TINY_DEMO, **{k: {**TINY_DEMO.get(k, {}), **v} for k, v in change.items()}}
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert main(["demo", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_demo_config_is_named(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "demo configuration not found" in capsys.readouterr().err


def test_shipped_demo_config_is_valid():
    base, synthetic, rest = read_demo_config(default_config_path(), ["synthetic.per_cam=2", "optim.lr=0.1"])
    assert synthetic["per_cam"] == 2 and rest == ["optim.lr=0.1"]
    cfg = config_from_dict(base, rest + ["data.aux_root=a", "data.target_root=b"])
    generator = SyntheticConfig.from_dict({**synthetic, "seed": 0})
    # The crops are fed at the size they are generated.
    assert [cfg.data.height, cfg.data.width] == list(generator.image_size)


def test_experiment_runs_the_named_variants_on_configured_data(tmp_path, capsys):
    make_market_tree(tmp_path / "aux", ids=5, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(tmp_path / "tgt", ids=5, cams=3, per_id=4, size=(32, 16), seed=2)
    settings = {k: v for k, v in TINY_DEMO.items() if k != "synthetic"}
    settings["data"] = {**settings["data"], "aux_root": str(tmp_path / "aux"), "target_root": str(tmp_path / "tgt")}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(settings))
    run_dir = tmp_path / "run"
    assert main(["experiment", str(config), "--run-dir", str(run_dir), "--variants", "mar,no_rj",
                 "--set", "optim.epochs=1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"method", "direct transfer", "MAR (all losses)", "MAR without L_RJ"}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["target"]["root"] == str(tmp_path / "tgt")
    assert results["variants"]["no_rj"]["steps"] == 20 // 8  # one epoch, --set applied
    assert main(["experiment", str(config), "--run-dir", str(run_dir), "--variants", "mar,bogus"]) == 2
    assert "unknown variant 'bogus'" in capsys.readouterr().err
    # --rerank on the finished run: the stages are evaluated again, none is trained again.
    logged = len(read_log(run_dir / "stages.jsonl"))
    assert main(["experiment", str(config), "--run-dir", str(run_dir), "--variants", "mar,no_rj",
                 "--set", "optim.epochs=1", "--rerank"]) == 0
    decisions = [(r["stage"], r["event"]) for r in read_log(run_dir / "stages.jsonl")[logged:]]
    assert decisions == [("pretrain", "skip"), ("direct", "start"), ("direct", "done"), ("mar/mar", "reevaluate"),
                         ("mar/mar", "done"), ("mar/no_rj", "reevaluate"), ("mar/no_rj", "done")]
    rows = table_rows(capsys.readouterr().out)
    assert rows["method"][-4:] == ["rank-1 re-ranked", "mAP re-ranked", "training steps", "wall time"]
    reranked = json.loads((run_dir / "results.json").read_text())["variants"]["no_rj"]["rerank"]["metrics"]
    assert rows["MAR without L_RJ"][-4:-2] == [f"{100 * reranked['rank1']:.1f}", f"{100 * reranked['mAP']:.1f}"]


def test_demo_rerank_adds_the_reranked_columns_to_the_seeds_table(demo, tmp_path, capsys):
    config, _ = demo
    run_dir = tmp_path / "run"
    assert main(["demo", "--config", str(config), "--run-dir", str(run_dir), "--seeds", "2", "--threads", "1",
                 "--rerank"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["method"][-3:] == ["rank-1 re-ranked", "mAP re-ranked", "wall time (mean)"]
    report = json.loads((run_dir / "results.json").read_text())
    per_seed = [json.loads((run_dir / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    values = np.array([r["variants"]["mar"]["rerank"]["metrics"]["mAP"] for r in per_seed])
    stat = report["summary"]["mar"]["rerank"]["metrics"]["mAP"]
    assert stat["mean"] == pytest.approx(values.mean()) and stat["std"] == pytest.approx(values.std(ddof=1))
    assert rows["MAR (all losses)"][-2] == f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def test_rerank_keeps_the_demo_on_its_shipped_settings():
    """Re-ranking leaves the compared (not re-ranked) numbers alone, so the expected range still applies."""
    args = build_parser().parse_args(["demo", "--rerank"])
    assert args.rerank and shipped_settings(args)


@pytest.mark.parametrize("command", ["experiment", "demo"])
def test_rerank_help_says_what_it_costs(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--rerank" in text and "about 3 min per evaluated stage at Market-1501 size on 2 CPU cores" in text
