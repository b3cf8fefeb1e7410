"""The staged runner on tiny generated data: result files, skipping finished stages, resuming
interrupted ones, the variants' switches and the seeds aggregation. CPU, tiny backbone."""

from __future__ import annotations

import json
import math
import re
import signal

import numpy as np
import pytest
import torch
import yaml

from fakedata import make_training_trees
from test_robustness_inputs import hold_lock_in_child, stop_child
from marreid.cli import main
from marreid.config import load_config
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine import pipeline
from marreid.engine.extract import (
    eval_transform,
    evaluate_model,
    evaluate_reranked,
    extract_features,
    load_target,
    model_from_checkpoint,
    rank_metrics,
)
from marreid.engine.logging import read_log
from marreid.engine.preflight import lock_run_dir
from marreid.engine.pipeline import Pipeline, aggregate_seeds, results_markdown, run_pipeline, seeds_markdown
from marreid.engine.train import MARTrainer
from marreid.engine.variants import ABLATION, VARIANTS, parse_variants, variant_config
from marreid.errors import ConfigError, TrainingError

AUX_IMAGES = 6 * 4  # ids x images per id
PRETRAIN_STEPS = 2 * (AUX_IMAGES // 8)  # 2 epochs of batches of 8
MAR_STEPS = 2 * (AUX_IMAGES // 8)  # an epoch is a pass over the auxiliary set


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return make_training_trees(tmp_path_factory.mktemp("pipeline_data"))


def config(trees, *extra):
    return load_config(None, [
        f"data.aux_root={trees / 'aux'}", "data.aux_format=market1501",
        f"data.target_root={trees / 'tgt'}", "data.target_format=market1501",
        "data.height=32", "data.width=16", "data.pad=2", "data.num_workers=0", "model.arch=tiny",
        "pretrain.epochs=2", "pretrain.batch_size=8", "pretrain.lr=0.05",
        "optim.epochs=2", "optim.lr=0.01", "train.aux_batch=8", "train.target_batch=8",
        "mar.mining_ratio=0.1", "mar.mdl_start_epoch=1", "train.device=cpu", "train.progress=false",
        "train.checkpoint_every_steps=1", *extra,
    ])


def quiet(_text: str) -> None:
    pass


def events(run_dir) -> list[tuple[str, str]]:
    return [(r["stage"], r["event"]) for r in read_log(run_dir / "stages.jsonl")]


@pytest.fixture(scope="module")
def finished(trees, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    results = run_pipeline(config(trees), run_dir, ["mar", "no_cml"], echo=quiet)
    return run_dir, results


def test_results_json_holds_every_stage_and_setting(finished, trees):
    run_dir, results = finished
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert results["ap_rule"] == "plain" and results["rules"] == ["plain", "mar-release"]
    assert results["backbone"] == "tiny" and results["input_size"] == [32, 16]
    assert results["auxiliary"]["root"] == str(trees / "aux") and results["target"]["root"] == str(trees / "tgt")
    assert results["pretrain"]["steps"] == PRETRAIN_STEPS and results["pretrain"]["status"] == "done"
    assert results["pretrain"]["images_per_s"] > 0 and results["pretrain"]["wall_s"] > 0
    assert set(results["variants"]) == {"mar", "no_cml"}
    for stage in [results["direct"], *results["variants"].values()]:
        assert stage["wall_s"] > 0 and stage["num_query"] == 6
        for rule in ("plain", "mar-release"):
            assert set(stage["metrics"][rule]) == {"rank1", "rank5", "rank10", "mAP"}
            assert all(0.0 <= v <= 1.0 for v in stage["metrics"][rule].values())
            m = stage["metrics"][rule]
            assert m["rank1"] <= m["rank5"] <= m["rank10"]
    for result in results["variants"].values():
        assert result["steps"] == MAR_STEPS and result["images_per_s"] > 0


def test_each_rule_matches_a_separate_evaluation(finished, trees):
    """One extraction scored under two rules equals evaluate_model run once per rule."""
    run_dir, results = finished
    for rule in ("plain", "mar-release"):
        cfg = config(trees, f"eval.ap_rule={rule}")
        for path, stage in ((run_dir / "pretrain" / "last.pt", results["direct"]),
                            (run_dir / "mar" / "mar" / "last.pt", results["variants"]["mar"])):
            model = model_from_checkpoint(load_checkpoint(path), str(path), cfg)
            expected = evaluate_model(model, load_target(cfg), cfg, "cpu")
            for key in ("rank1", "rank5", "rank10", "mAP"):
                assert stage["metrics"][rule][key] == pytest.approx(expected[key], abs=1e-12)


def test_results_markdown_has_a_row_per_stage(finished):
    run_dir, results = finished
    lines = (run_dir / "results.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "direct transfer", "MAR (all losses)", "MAR without L_CML"}
    mar = results["variants"]["mar"]["metrics"]
    cells = [c.strip() for c in rows["MAR (all losses)"].split("|")[2:-1]]
    assert cells[0] == f"{100 * mar['plain']['rank1']:.1f}" and cells[3] == f"{100 * mar['plain']['mAP']:.1f}"
    assert cells[4] == f"{100 * mar['mar-release']['mAP']:.1f}" and cells[5] == str(MAR_STEPS)
    assert any("under the plain AP rule" in line for line in lines)


def test_rerun_skips_every_finished_stage(finished, trees):
    run_dir, results = finished
    checkpoints = [run_dir / "pretrain" / "last.pt", run_dir / "mar" / "mar" / "last.pt",
                   run_dir / "mar" / "no_cml" / "last.pt"]
    before = [p.stat().st_mtime_ns for p in checkpoints]
    logged = len(events(run_dir))
    again = run_pipeline(config(trees), run_dir, ["mar", "no_cml"], echo=quiet)
    assert events(run_dir)[logged:] == [("pretrain", "skip"), ("direct", "skip"), ("mar/mar", "skip"),
                                        ("mar/no_cml", "skip")]
    assert [p.stat().st_mtime_ns for p in checkpoints] == before
    assert again["variants"]["mar"]["metrics"] == results["variants"]["mar"]["metrics"]


def test_changed_mar_option_reruns_only_that_stage(trees, tmp_path):
    run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    logged = len(events(tmp_path))
    run_pipeline(config(trees, "optim.lr=0.02"), tmp_path, ["mar"], echo=quiet)
    assert events(tmp_path)[logged:] == [("pretrain", "skip"), ("direct", "skip"), ("mar/mar", "restart"),
                                         ("mar/mar", "start"), ("mar/mar", "done")]
    saved = yaml.safe_load((tmp_path / "mar" / "mar" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.02
    # The restarted stage logged its steps once, from 0: the old run's log was cleared.
    assert [r["step"] for r in read_log(tmp_path / "mar" / "mar" / "log.jsonl", "step")] == list(range(MAR_STEPS))


def test_given_checkpoint_ignores_the_pretrain_options(finished, trees, tmp_path):
    run_dir, _ = finished
    given = f"train.pretrained_checkpoint={run_dir / 'pretrain' / 'last.pt'}"
    run_pipeline(config(trees, given), tmp_path, ["mar"], echo=quiet)
    logged = len(events(tmp_path))
    run_pipeline(config(trees, given, "pretrain.lr=0.5", "pretrain.epochs=7"), tmp_path, ["mar"], echo=quiet)
    assert events(tmp_path)[logged:] == [("direct", "skip"), ("mar/mar", "skip")]


def test_changed_ap_rule_reevaluates_without_retraining(trees, tmp_path):
    run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    checkpoint = tmp_path / "mar" / "mar" / "last.pt"
    before = checkpoint.stat().st_mtime_ns
    logged = len(events(tmp_path))
    results = run_pipeline(config(trees, "eval.ap_rule=trapezoid"), tmp_path, ["mar"], echo=quiet)
    assert events(tmp_path)[logged:] == [("pretrain", "skip"), ("direct", "start"), ("direct", "done"),
                                         ("mar/mar", "reevaluate"), ("mar/mar", "done")]
    assert checkpoint.stat().st_mtime_ns == before
    assert [r["step"] for r in read_log(tmp_path / "mar" / "mar" / "log.jsonl", "step")] == list(range(MAR_STEPS))
    # Scored from the checkpoint: the training run was not even continued (one start record).
    assert len(read_log(tmp_path / "mar" / "mar" / "log.jsonl", "start")) == 1
    assert results["rules"] == ["trapezoid", "mar-release"]
    assert set(results["variants"]["mar"]["metrics"]) == {"trapezoid", "mar-release"}


RERANK = ("eval.rerank=true", "eval.rerank_k1=5", "eval.rerank_k2=2", "eval.rerank_lambda=0.5")


def reranked_by_hand(cfg, checkpoint) -> dict:
    """evaluate_reranked of the checkpoint's features, extracted here, under cfg's rule and settings."""
    model = model_from_checkpoint(load_checkpoint(checkpoint), str(checkpoint), cfg)
    target = load_target(cfg)
    common = dict(transform=eval_transform(cfg), batch_size=cfg.eval.batch_size, num_workers=0, device="cpu")
    qf, q_pids, q_camids = extract_features(model, target.query, **common)
    gf, g_pids, g_camids = extract_features(model, target.gallery, **common)
    return rank_metrics(evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, k1=5, k2=2,
                                          lambda_value=0.5, ap_rule=cfg.eval.ap_rule))


def test_rerank_on_a_finished_run_adds_the_column_without_retraining(trees, tmp_path, monkeypatch):
    plain = run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    assert "rerank" not in plain["direct"] and "rerank" not in plain["variants"]["mar"]
    assert "re-ranked" not in (tmp_path / "results.md").read_text()
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "pretrain" / "last.pt",
                                                     tmp_path / "mar" / "mar" / "last.pt")}
    logged = len(events(tmp_path))

    def no_training(*args, **kwargs):
        raise AssertionError("a stage was trained again")

    monkeypatch.setattr(pipeline, "run_train", no_training)
    monkeypatch.setattr(pipeline, "run_pretrain", no_training)
    cfg = config(trees, *RERANK)
    results = run_pipeline(cfg, tmp_path, ["mar"], echo=quiet)
    assert events(tmp_path)[logged:] == [("pretrain", "skip"), ("direct", "start"), ("direct", "done"),
                                         ("mar/mar", "reevaluate"), ("mar/mar", "done")]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    mar = results["variants"]["mar"]
    assert mar["steps"] == MAR_STEPS and mar["status"] == "done"
    assert mar["images_per_s"] == plain["variants"]["mar"]["images_per_s"]
    assert mar["wall_s"] > plain["variants"]["mar"]["wall_s"]  # the evaluation's time is added
    # The plain metrics are unchanged; the re-ranked ones equal evaluate_reranked of the same features.
    for stage, checkpoint in ((results["direct"], "pretrain"), (mar, "mar/mar")):
        assert set(stage["rerank"]) == {"ap_rule", "k1", "k2", "lambda", "seconds", "metrics"}
        assert (stage["rerank"]["ap_rule"], stage["rerank"]["k1"], stage["rerank"]["k2"],
                stage["rerank"]["lambda"]) == ("plain", 5, 2, 0.5)
        expected = reranked_by_hand(cfg, tmp_path / checkpoint / "last.pt")
        assert stage["rerank"]["metrics"] == pytest.approx(expected, abs=1e-12)
    assert mar["metrics"] == plain["variants"]["mar"]["metrics"]
    assert json.loads((tmp_path / "mar" / "mar" / "result.json").read_text())["rerank"] == mar["rerank"]

    # The same options again: every stage is skipped, the column stays.
    logged = len(events(tmp_path))
    again = run_pipeline(cfg, tmp_path, ["mar"], echo=quiet)
    assert events(tmp_path)[logged:] == [("pretrain", "skip"), ("direct", "skip"), ("mar/mar", "skip")]
    assert again["variants"]["mar"]["rerank"] == mar["rerank"]
    # Re-ranking off again: re-evaluated once more, and no re-ranked block is left behind.
    off = run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    assert "rerank" not in off["direct"] and "rerank" not in off["variants"]["mar"]
    assert off["variants"]["mar"]["metrics"] == plain["variants"]["mar"]["metrics"]


def test_reevaluation_leaves_a_stage_folder_another_run_holds_alone(trees, tmp_path):
    run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    stage = tmp_path / "mar" / "mar"
    result = (stage / "result.json").read_text()
    lock_run_dir(tmp_path, "run folder")  # this process lets go of the stage folder its training locked
    holder = hold_lock_in_child(stage)
    try:
        with pytest.raises(ConfigError, match=f"stage folder: {stage} is in use by another marreid run"):
            run_pipeline(config(trees, "eval.rerank=true"), tmp_path, ["mar"], echo=quiet)
    finally:
        stop_child(holder)
    assert (stage / "result.json").read_text() == result


def test_results_markdown_shows_the_reranked_columns_and_old_results_render():
    results = {**fake_results([0.2, 0.3], [0.5, 0.6], rerank=[0.25, 0.6]), "ap_rule": "plain",
               "backbone": "tiny", "input_size": [32, 16], "distance": "cosine", "seed": 0, "device": "cpu",
               "auxiliary": {"root": "a", "format": "market1501"}, "target": {"root": "t", "format": "market1501"},
               "pretrain": {"status": "done", "steps": 3, "wall_s": 1.0}}
    lines = results_markdown(results).splitlines()
    assert lines[0] == ("| method | rank-1 | rank-5 | rank-10 | mAP (plain) | mAP (mar-release) | rank-1 re-ranked | "
                        "mAP re-ranked | training steps | wall time |")
    assert lines[2] == "| direct transfer | 20.0 | 20.0 | 20.0 | 20.0 | 30.0 | 25.0 | 25.0 | - | 10 s |"
    assert lines[3] == "| MAR (all losses) | 50.0 | 50.0 | 50.0 | 50.0 | 60.0 | 60.0 | 60.0 | 5 | 10 s |"
    assert "k1 = 20, k2 = 6, lambda = 0.3), under the plain AP rule." in lines[-1]
    # A results.json written before re-ranking existed (no "rerank" block) renders as it did.
    old = {**results, "direct": strip_rerank(results["direct"]),
           "variants": {"mar": strip_rerank(results["variants"]["mar"])}}
    text = results_markdown(old)
    assert "re-ranked" not in text
    assert text.splitlines()[2] == "| direct transfer | 20.0 | 20.0 | 20.0 | 20.0 | 30.0 | - | 10 s |"


def test_seed_aggregation_of_the_reranked_metrics():
    per_seed = {0: fake_results([0.2, 0.3], [0.5, 0.6], rerank=[0.3, 0.6]),
                1: fake_results([0.4, 0.3], [0.7, 0.6], rerank=[0.5, 0.8])}
    summary = aggregate_seeds(per_seed)
    direct = summary["direct"]["rerank"]
    assert (direct["ap_rule"], direct["k1"], direct["k2"], direct["lambda"]) == ("plain", 20, 6, 0.3)
    assert direct["metrics"]["mAP"]["values"] == [0.3, 0.5]
    assert direct["metrics"]["mAP"]["mean"] == pytest.approx(0.4)
    assert direct["metrics"]["rank1"]["std"] == pytest.approx(math.sqrt(0.02))
    table = seeds_markdown(summary, [0, 1], "plain", ["plain", "mar-release"])
    head = table.splitlines()[0]
    assert "| rank-1 re-ranked | mAP re-ranked | wall time (mean) |" in head
    assert f"| 40.0 ± {100 * math.sqrt(0.02):.1f} | 40.0 ± {100 * math.sqrt(0.02):.1f} | 10 s |" in table
    # A seed without re-ranking (an older run): no re-ranked entry, no re-ranked columns.
    per_seed[1] = {**per_seed[1], "direct": strip_rerank(per_seed[1]["direct"]),
                   "variants": {"mar": strip_rerank(per_seed[1]["variants"]["mar"])}}
    mixed = aggregate_seeds(per_seed)
    assert "rerank" not in mixed["direct"] and "rerank" not in mixed["mar"]
    assert "re-ranked" not in seeds_markdown(mixed, [0, 1], "plain", ["plain", "mar-release"])


def test_ctrl_c_stops_a_stage_which_the_next_run_continues_exactly(finished, trees, tmp_path, monkeypatch):
    reference_dir, reference = finished
    original = MARTrainer.compute_loss

    def interrupted(self, epoch, aux_batch, target_batch):
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)  # the handler asks for a stop after this step
        return original(self, epoch, aux_batch, target_batch)

    monkeypatch.setattr(MARTrainer, "compute_loss", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingError, match="stopped at step 4"):
        run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    assert signal.getsignal(signal.SIGINT) is handler  # the stop handler was taken down
    assert not (tmp_path / "mar" / "mar" / "result.json").exists()
    assert load_checkpoint(tmp_path / "mar" / "mar" / "last.pt")["step"] == 4
    monkeypatch.setattr(MARTrainer, "compute_loss", original)

    results = run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    assert ("mar/mar", "resume") in events(tmp_path)
    assert [r["resumed_at"] for r in read_log(tmp_path / "mar" / "mar" / "log.jsonl", "start")] == [0, 4]
    assert [r["step"] for r in read_log(tmp_path / "mar" / "mar" / "log.jsonl", "step")] == list(range(MAR_STEPS))
    # Pretraining was seeded the same, so the interrupted-and-continued stage ends where the
    # uninterrupted one did.
    final = load_checkpoint(tmp_path / "mar" / "mar" / "last.pt")["model"]
    expected = load_checkpoint(reference_dir / "mar" / "mar" / "last.pt")["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert results["variants"]["mar"]["metrics"] == reference["variants"]["mar"]["metrics"]


def test_a_crash_mid_pretraining_resumes_from_the_last_checkpoint(trees, tmp_path, monkeypatch):
    from marreid.engine.pretrain import Pretrainer

    original = Pretrainer.compute_loss

    def crash(self, epoch, aux_batch, target_batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, epoch, aux_batch, target_batch)

    monkeypatch.setattr(Pretrainer, "compute_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    first_attempt = json.loads((tmp_path / "pretrain" / "stage.json").read_text())["seconds"]
    assert first_attempt > 0
    monkeypatch.setattr(Pretrainer, "compute_loss", original)
    results = run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    assert ("pretrain", "resume") in events(tmp_path)
    assert [r["step"] for r in read_log(tmp_path / "pretrain" / "log.jsonl", "step")] == list(range(PRETRAIN_STEPS))
    # The stage's wall time counts both attempts.
    assert results["pretrain"]["wall_s"] > first_attempt


def test_a_raised_step_cap_continues_the_stage_and_refreshes_what_depends_on_it(trees, tmp_path):
    capped = run_pipeline(config(trees, "pretrain.max_steps=2", "train.max_steps=3"), tmp_path, ["mar"], echo=quiet)
    assert capped["pretrain"]["steps"] == 2 and capped["variants"]["mar"]["steps"] == 3
    logged = len(events(tmp_path))
    full = run_pipeline(config(trees), tmp_path, ["mar"], echo=quiet)
    assert events(tmp_path)[logged:] == [("pretrain", "resume"), ("pretrain", "done"), ("direct", "start"),
                                         ("direct", "done"), ("mar/mar", "restart"), ("mar/mar", "start"),
                                         ("mar/mar", "done")]
    assert full["pretrain"]["steps"] == PRETRAIN_STEPS and full["variants"]["mar"]["steps"] == MAR_STEPS


def test_ablation_variants_set_their_switches_in_config_and_loss(trees, tmp_path):
    expected = {  # (use_al, use_rj, use_cml, use_mdl, hard_labels, positives)
        "mar": (True, True, True, True, False, "agreement"),
        "no_cml": (True, True, False, True, False, "agreement"),
        "no_mdl": (True, True, True, False, False, "agreement"),
        "no_rj": (True, False, True, True, False, "agreement"),
        "hard_labels": (True, True, True, True, True, "agreement"),
    }
    assert set(ABLATION) == set(expected)
    run_pipeline(config(trees), tmp_path, list(ABLATION), echo=quiet)
    pretrained = str(tmp_path / "pretrain" / "last.pt")
    logs = {}
    for name, switches in expected.items():
        saved = yaml.safe_load((tmp_path / "mar" / name / "config.yaml").read_text())
        m = saved["mar"]
        assert (m["use_al"], m["use_rj"], m["use_cml"], m["use_mdl"], m["hard_labels"], m["positives"]) == switches
        assert saved["train"]["pretrained_checkpoint"] == pretrained
        assert load_checkpoint(tmp_path / "mar" / name / "last.pt")["config"]["mar"] == m
        logs[name] = read_log(tmp_path / "mar" / name / "log.jsonl", "step")
    # The switches reach the loss: a switched-off term is 0 at every step, and on otherwise.
    assert all(r["cml"] == 0 for r in logs["no_cml"]) and all(r["cml"] > 0 for r in logs["mar"])
    assert all(r["mdl"] == 0 and r["mined"] == 0 for r in logs["no_mdl"])
    assert any(r["mined"] > 0 for r in logs["mar"])
    assert all(r["rj"] == 0 for r in logs["no_rj"]) and all(r["rj"] > 0 for r in logs["mar"])
    # Hard labels: agreements are 0 or 1, so T starts at 0 or 1; soft ones give a T in between.
    first_mdl = {name: next(r for r in logs[name] if r["mined"] > 0) for name in ("mar", "hard_labels")}
    assert first_mdl["hard_labels"]["threshold"] in (0.0, 1.0)
    assert 0.0 < first_mdl["mar"]["threshold"] < 1.0


def test_every_named_variant_resolves_and_unknown_names_are_refused(trees):
    cfg = config(trees)
    assert variant_config(cfg, "no_ral").mar.use_al is False and variant_config(cfg, "no_ral").mar.use_rj is False
    assert variant_config(cfg, "feature_mining").mar.positives == "feature"
    assert variant_config(cfg, "mar") == cfg
    assert parse_variants("mar, no_cml,mar") == ["mar", "no_cml"]
    with pytest.raises(ConfigError, match="unknown variant 'bogus'"):
        parse_variants("mar,bogus")
    with pytest.raises(ConfigError, match="unknown variant"):
        Pipeline(cfg, "unused", ["nope"])


@pytest.mark.parametrize("command", ["experiment", "demo"])
def test_variants_help_lists_every_variant(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    listed = re.search(r"known: ((?:\w+, )*\w+)", text).group(1).split(", ")
    assert listed == list(VARIANTS)


def fake_results(direct: list[float], mar: list[float], rerank: list[float] | None = None) -> dict:
    """Results of one seed whose metrics all equal the given plain / mar-release values, and
    with ``rerank`` (direct, MAR) the re-ranked ones (default settings, plain rule)."""
    def stage(values, reranked):
        plain, release = values
        result = {"metrics": {"plain": dict.fromkeys(("rank1", "rank5", "rank10", "mAP"), plain),
                              "mar-release": dict.fromkeys(("rank1", "rank5", "rank10", "mAP"), release)},
                  "wall_s": 10.0, "steps": 5}
        if reranked is not None:
            result["rerank"] = {"ap_rule": "plain", "k1": 20, "k2": 6, "lambda": 0.3, "seconds": 1.0,
                                "metrics": dict.fromkeys(("rank1", "rank5", "rank10", "mAP"), reranked)}
        return result
    direct_rr, mar_rr = rerank if rerank is not None else (None, None)
    return {"rules": ["plain", "mar-release"], "direct": stage(direct, direct_rr),
            "variants": {"mar": {**stage(mar, mar_rr), "label": "MAR (all losses)"}}}


def strip_rerank(stage: dict) -> dict:
    """A stage result as marreid wrote it before re-ranking was a pipeline option."""
    return {key: value for key, value in stage.items() if key != "rerank"}


def test_seed_aggregation_by_hand():
    per_seed = {0: fake_results([0.2, 0.3], [0.5, 0.6]), 1: fake_results([0.4, 0.3], [0.7, 0.6]),
                2: fake_results([0.9, 0.3], [0.6, 0.6])}
    summary = aggregate_seeds(per_seed)
    direct = summary["direct"]["plain"]["mAP"]
    assert direct["values"] == [0.2, 0.4, 0.9]
    # mean 0.5; deviations -0.3, -0.1, 0.4: sample variance (0.09 + 0.01 + 0.16) / 2 = 0.13
    assert direct["mean"] == pytest.approx(0.5) and direct["std"] == pytest.approx(math.sqrt(0.13))
    assert summary["direct"]["mar-release"]["rank1"]["std"] == pytest.approx(0.0, abs=1e-15)
    assert summary["mar"]["plain"]["rank5"]["mean"] == pytest.approx(0.6)
    assert summary["mar"]["plain"]["rank5"]["std"] == pytest.approx(0.1)  # deviations -0.1, 0.1, 0
    table = seeds_markdown(summary, [0, 1, 2], "plain", ["plain", "mar-release"])
    assert f"| direct transfer | 50.0 ± {100 * math.sqrt(0.13):.1f} |" in table
    assert aggregate_seeds({0: per_seed[0]})["mar"]["plain"]["mAP"]["std"] == 0.0


def test_seed_aggregation_of_real_runs_matches_numpy(finished, trees, tmp_path):
    _, first = finished
    second = run_pipeline(config(trees, "train.seed=1"), tmp_path, ["mar", "no_cml"], echo=quiet)
    summary = aggregate_seeds({0: first, 1: second})
    for row, pick in (("direct", lambda r: r["direct"]), ("no_cml", lambda r: r["variants"]["no_cml"])):
        for rule in ("plain", "mar-release"):
            for key in ("rank1", "mAP"):
                values = np.array([pick(first)["metrics"][rule][key], pick(second)["metrics"][rule][key]])
                assert summary[row][rule][key]["mean"] == pytest.approx(values.mean())
                assert summary[row][rule][key]["std"] == pytest.approx(values.std(ddof=1))


def test_training_fingerprint_holds_the_methods_own_sections_only():
    from marreid.config import load_config
    from marreid.engine.pipeline import fingerprint, training_options
    from marreid.engine.variants import variant_config

    mar = load_config(None)
    fp = fingerprint(mar, training_options(mar))
    # as recorded before methods existed: MAR's sections, no cc, no train.method
    assert {"mar", "optim"} <= set(fp) and "cc" not in fp and "method" not in fp["train"]
    cc = variant_config(mar, "cc_cml")
    fp_cc = fingerprint(cc, training_options(cc))
    assert fp_cc["train"]["method"] == "cluster_contrast" and fp_cc["cc"]["cml"] is True
    assert "optim" not in fp_cc
