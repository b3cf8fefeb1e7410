"""The staged runner behind ``marreid demo`` and ``marreid experiment``.

Stages, each in its own folder of the run folder:

- ``pretrain/``: supervised L_AL on the auxiliary set (skipped when
  ``train.pretrained_checkpoint`` names a checkpoint to start from);
- ``direct/``: the pretrained model evaluated on the target (direct transfer);
- ``mar/<variant>/``: MAR training from the pretrained checkpoint with the
  variant's overrides (``engine.variants``), then evaluation.

Each stage's *fingerprint* is the options that decide what it computes, and
``engine.stages.plan_stage`` decides what becomes of it: a stage whose
``result.json`` was computed from the same options is skipped; a stage whose
folder holds a checkpoint of the same options continues from it; a folder
left by other options is cleared and its stage started again from scratch.
``stages.jsonl`` records every decision. Training goes through ``run_pretrain`` / ``run_train``,
so their preflight checks and their stop on SIGINT / SIGTERM (finish the step,
checkpoint) apply; a stopped stage is a TrainingError saying how to continue.
Evaluation extracts features once and scores them under the configured AP
rule and under ``mar-release`` (the rule of the paper's numbers), and with
``eval.rerank`` after k-reciprocal re-ranking too. A trained stage whose
evaluation options alone changed (``--rerank`` turned on, another AP rule) is
evaluated again from its checkpoint, without going through training.
``results.json`` and ``results.md`` summarise the run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marreid import __version__
from marreid.config import Config, TrainConfig, config_to_dict, load_config, save_config
from marreid.data import ReidDataset
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.extract import (
    REPORTED_RANKS,
    eval_transform,
    evaluate_reranked,
    extract_features,
    load_target,
    model_from_checkpoint,
    rank_metrics,
    resolve_device,
)
from marreid.engine.logging import read_log
from marreid.engine.preflight import lock_run_dir
from marreid.engine.pretrain import run_pretrain
from marreid.engine.stages import (
    RESTART,
    RESUME,
    SKIP,
    clear_stage,
    differences,
    plan_stage,
    read_json,
    write_json,
)
from marreid.engine.train import run_train
from marreid.engine.variants import ABLATION, VARIANTS, parse_variants, variant_config, with_overrides
from marreid.errors import ConfigError, TrainingError
from marreid.methods.registry import method_class
from marreid.metrics.rank import evaluate_features

COMPARISON_RULE = "mar-release"
DEFAULT_METHOD = TrainConfig().method
RESULT_FILE = "result.json"
STAGE_FILE = "stage.json"
STAGE_LOG = "stages.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

DIRECT_LABEL = "direct transfer"
METRIC_KEYS = tuple(f"rank{r}" for r in REPORTED_RANKS) + ("mAP",)
# The re-ranked metrics the tables show (results.json holds all of METRIC_KEYS).
RERANK_COLUMNS = {"rank1": "rank-1 re-ranked", "mAP": "mAP re-ranked"}
RERANK_SETTINGS = ("ap_rule", "k1", "k2", "lambda")
# What _plan answers for a trained stage whose evaluation options alone changed.
REEVALUATE = "reevaluate"

PRETRAIN_OPTIONS = ("data", "model", "pretrain", "train.seed", "train.deterministic")
# A training stage's options are these and its method's own sections (``Method.sections``).
TRAIN_OPTIONS = ("data", "model", "pretrain", "train")
# How a stage runs, not what it computes: a change here neither skips nor restarts it.
# The step caps are handled apart: raising a cap continues a capped stage.
_RUN_ONLY = ("data.num_workers", "data.verify_images", "model.trust_checkpoint", "pretrain.max_steps",
             "train.pretrained_checkpoint", "train.checkpoint_every_steps", "train.keep_epoch_checkpoints",
             "train.eval_every_epochs", "train.max_steps", "train.device", "train.diagnostics", "train.progress",
             "train.channels_last", "eval.batch_size")


def fingerprint(cfg: Config, options: Sequence[str]) -> dict:
    """The values of ``options`` (``section`` or ``section.key``) that decide a stage's outcome."""
    full = config_to_dict(cfg)
    picked: dict[str, Any] = {}
    for name in options:
        section, _, key = name.partition(".")
        if key:
            picked.setdefault(section, {})[key] = full[section][key]
        else:
            picked[section] = dict(full[section])
    for name in _RUN_ONLY:
        section, _, key = name.partition(".")
        picked.get(section, {}).pop(key, None)
    # The default method is left out, so stages recorded before train.method existed keep their fingerprint.
    if picked.get("train", {}).get("method") == DEFAULT_METHOD:
        del picked["train"]["method"]
    return picked


def training_options(cfg: Config) -> tuple[str, ...]:
    """The options a training stage's outcome depends on: ``TRAIN_OPTIONS`` and its method's sections."""
    return TRAIN_OPTIONS + method_class(cfg.train.method).sections


def evaluation_rules(cfg: Config) -> list[str]:
    """The configured AP rule, then ``mar-release`` (the paper's) when it differs."""
    return list(dict.fromkeys([cfg.eval.ap_rule, COMPARISON_RULE]))


def evaluate_rules(model: torch.nn.Module, dataset: ReidDataset, cfg: Config, device: torch.device) -> dict:
    """Rank-1/5/10 and mAP of ``model`` on ``dataset`` under every rule of ``evaluation_rules``.

    Features are extracted once (eval transform, ``cfg.eval`` distance); returns
    ``{"metrics": {rule: {"rank1", "rank5", "rank10", "mAP"}}, "num_query", "num_gallery",
    "num_valid_queries", "eval_s", "eval_images_per_s"}``, and with ``cfg.eval.rerank`` also
    ``"rerank"`` (:func:`rerank_scores` of the same features). ``eval_s`` leaves the re-ranking
    out, so the evaluation throughput compares across runs with and without it.
    """
    start = time.perf_counter()
    common = dict(transform=eval_transform(cfg), batch_size=cfg.eval.batch_size,
                  num_workers=cfg.data.num_workers, device=device)
    query = extract_features(model, dataset.query, **common)
    gallery = extract_features(model, dataset.gallery, **common)
    (qf, q_pids, q_camids), (gf, g_pids, g_camids) = query, gallery
    metrics, valid = {}, 0
    for rule in evaluation_rules(cfg):
        result = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric=cfg.eval.metric,
                                   max_rank=max(cfg.eval.max_rank, max(REPORTED_RANKS)), ap_rule=rule)
        metrics[rule] = rank_metrics(result)
        valid = result.num_valid_queries
    seconds = time.perf_counter() - start
    images = len(dataset.query) + len(dataset.gallery)
    scores = {"metrics": metrics, "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
              "num_valid_queries": int(valid), "eval_s": seconds, "eval_images_per_s": images / max(seconds, 1e-9)}
    if cfg.eval.rerank:
        scores["rerank"] = rerank_scores(query, gallery, cfg)
    return scores


def rerank_scores(query: tuple, gallery: tuple, cfg: Config) -> dict:
    """Rank-1/5/10 and mAP of the k-reciprocal re-ranked distance between ``query`` and ``gallery``
    (each ``(features, pids, camids)`` as ``extract_features`` returns them) under the configured
    AP rule, with ``cfg.eval``'s k1, k2 and lambda (``evaluate_reranked``).

    Returns ``{"ap_rule", "k1", "k2", "lambda", "seconds", "metrics": {"rank1", "rank5", "rank10", "mAP"}}``.
    """
    start = time.perf_counter()
    (qf, q_pids, q_camids), (gf, g_pids, g_camids) = query, gallery
    result = evaluate_reranked(qf, gf, q_pids, g_pids, q_camids, g_camids, k1=cfg.eval.rerank_k1,
                               k2=cfg.eval.rerank_k2, lambda_value=cfg.eval.rerank_lambda,
                               max_rank=max(cfg.eval.max_rank, max(REPORTED_RANKS)), ap_rule=cfg.eval.ap_rule)
    return {"ap_rule": cfg.eval.ap_rule, "k1": cfg.eval.rerank_k1, "k2": cfg.eval.rerank_k2,
            "lambda": cfg.eval.rerank_lambda, "seconds": time.perf_counter() - start,
            "metrics": rank_metrics(result)}


def _capped_done(result: dict, cap: int | None) -> bool:
    """A training result stands when it ran to the end, or to a cap at least as high as ``cap``."""
    if result.get("status") == "done":
        return True
    return result.get("status") == "max_steps" and cap is not None and result.get("steps", 0) >= cap


def _trained_with(finished: dict | None, run_fp: dict | None) -> bool:
    """Whether a finished stage's fingerprint ``finished`` differs from its training options
    ``run_fp`` by its evaluation options alone (a MAR stage's fingerprint is ``run_fp`` plus ``eval``)."""
    if finished is None or run_fp is None or "eval" not in finished:
        return False
    trained = {key: value for key, value in finished.items() if key != "eval"}
    return trained == json.loads(json.dumps(run_fp))  # as it reads back from result.json


def _upstream(pretrained: dict) -> dict:
    """What later stages depend on: the pretraining options and how far it ran (or the given file)."""
    return {"options": pretrained["fingerprint"], "steps": pretrained.get("steps")}


def throughput(log_path: Path) -> float | None:
    """Training images per second over every step a run's ``log.jsonl`` records, all attempts
    together: the harmonic mean of the per-step rates (every step has the same batch)."""
    rates = [r["images_per_s"] for r in read_log(log_path, "step") if r.get("images_per_s")]
    return len(rates) / sum(1.0 / r for r in rates) if rates else None


class Pipeline:
    """Runs (or continues) the stages of one configuration in ``run_dir``.

    Parameters
    ----------
    cfg : Config
        The base configuration; ``output`` is ignored (every stage writes under ``run_dir``).
    run_dir : path
        The run folder.
    variants : sequence of str
        MAR variants to train, names of ``VARIANTS``; all start from the same pretrained checkpoint.
    echo : callable
        Where one-line progress messages go.
    data_version : optional
        What identifies the data beyond its roots (e.g. the generator settings of
        synthetic data rewritten in place); part of every fingerprint.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, variants: Sequence[str] = ("mar",),
                 echo: Callable[[str], None] = print, data_version: Any = None) -> None:
        self.cfg = cfg
        self.data_version = data_version
        self.run_dir = Path(run_dir).absolute()
        self.variant_configs = {name: variant_config(cfg, name) for name in variants}
        self.echo = echo
        self.device = resolve_device(cfg.train.device)
        self._target: ReidDataset | None = None

    # the target's query / gallery, loaded once and only when an evaluation needs them
    @property
    def target(self) -> ReidDataset:
        if self._target is None:
            self._target = load_target(self.cfg)
        return self._target

    # bookkeeping --------------------------------------------------------------------
    def log(self, stage: str, event: str, **extra: Any) -> None:
        """Append one decision or outcome to ``stages.jsonl``."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": stage, "event": event, **extra}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / STAGE_LOG).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _plan(self, stage: str, folder: Path, fp: dict, stands: Callable[[dict], bool],
              run_fp: dict | None = None, config_options: Sequence[str] = ()) -> tuple[str, dict | None]:
        """What becomes of ``stage`` (``plan_stage``: ``fp`` decides its result, ``run_fp`` its
        training run), logged and announced; the action, and the finished result when skipped or
        when only its evaluation options changed (``REEVALUATE``: score its checkpoint again)."""
        result = read_json(folder / RESULT_FILE)
        finished = result.get("fingerprint") if result is not None and stands(result) else None
        plan = plan_stage(folder, fp, finished, self._recorded(folder, config_options), run_fp)
        if plan.action == SKIP:
            self.log(stage, "skip")
            self.echo(f"[{stage}] finished earlier with the same options: skipped")
            return SKIP, result
        # Continuing a finished run to re-evaluate it would load and screen both training sets
        # for no step; its checkpoint is all an evaluation needs.
        if plan.action == RESUME and _trained_with(finished, run_fp) and Path(result["checkpoint"]).is_file():
            changed = ", ".join("eval." + name for name in differences(finished["eval"], fp["eval"]))
            self.log(stage, REEVALUATE, changed=changed)
            self.echo(f"[{stage}] trained earlier with the same options, evaluated with others ({changed}): "
                      f"evaluating its checkpoint again")
            return REEVALUATE, result
        if plan.action == RESTART:
            self.echo(f"[{stage}] {folder} holds a run with other options ({plan.changes()}): starting it again")
            self.log(stage, "restart", changed=plan.changes())
        resume = plan.action == RESUME
        self.log(stage, "resume" if resume else "start")
        what = "evaluating" if stage == "direct" else "continuing from its checkpoint" if resume else "starting"
        self.echo(f"[{stage}] {what}")
        return plan.action, None

    def _recorded(self, folder: Path, config_options: Sequence[str]) -> dict | None:
        """The options of the run in ``folder``: its ``stage.json``, or for a folder a plain
        ``marreid`` command made, the ``config_options`` of its config.yaml; None when neither says."""
        state = read_json(folder / STAGE_FILE)
        if state is not None:
            return state.get("fingerprint")
        if config_options and self.data_version is None and (folder / "config.yaml").is_file():
            try:
                return fingerprint(load_config(folder / "config.yaml"), config_options)
            except ConfigError:
                return None
        return None

    @contextlib.contextmanager
    def _attempt(self, folder: Path, fp: dict) -> Iterator[Callable[[], float]]:
        """Record the stage's fingerprint in ``stage.json`` and its wall time summed over every
        attempt (an interrupted one included); yields the running total."""
        before = (read_json(folder / STAGE_FILE) or {}).get("seconds", 0.0)
        start = time.perf_counter()
        write_json(folder / STAGE_FILE, {"fingerprint": fp, "seconds": before})
        try:
            yield lambda: before + time.perf_counter() - start
        finally:
            write_json(folder / STAGE_FILE, {"fingerprint": fp, "seconds": before + time.perf_counter() - start})

    def _stopped(self, stage: str, run: dict) -> None:
        """TrainingError when a stop signal ended the stage before its end (checkpoint kept)."""
        if run["status"] == "stopped":
            self.log(stage, "stopped", step=run["steps"])
            raise TrainingError(f"stage {stage} stopped at step {run['steps']}, checkpoint {run['checkpoint']} "
                                f"kept: run the same command again to continue")

    # stages -------------------------------------------------------------------------
    def pretrain(self) -> dict:
        """Pretraining, or the given ``train.pretrained_checkpoint``; its result has ``checkpoint``
        and ``fingerprint`` (what later stages depend on)."""
        given = self.cfg.train.pretrained_checkpoint
        if given:
            path = Path(given).absolute()
            fp = {"pretrained_checkpoint": str(path), "data_version": self.data_version}
            return {"status": "given", "checkpoint": str(path), "fingerprint": fp}
        folder = self.run_dir / "pretrain"
        cfg = with_overrides(self.cfg, {"output.pretrain_dir": str(folder)})
        fp = fingerprint(cfg, PRETRAIN_OPTIONS)
        if self.data_version is not None:
            fp["data_version"] = self.data_version
        action, result = self._plan("pretrain", folder, fp, lambda r: _capped_done(r, cfg.pretrain.max_steps)
                                    and Path(r["checkpoint"]).is_file(), config_options=PRETRAIN_OPTIONS)
        if action == SKIP:
            return result
        if action != RESUME:
            clear_stage(folder)
        with self._attempt(folder, fp) as elapsed:
            run = run_pretrain(cfg, resume=action == RESUME)
        self._stopped("pretrain", run)
        result = {"status": run["status"], "steps": run["steps"], "checkpoint": run["checkpoint"],
                  "num_agents": run["num_agents"], "images_per_s": throughput(folder / "log.jsonl"),
                  "wall_s": elapsed(), "fingerprint": fp}
        write_json(folder / RESULT_FILE, result)
        self.log("pretrain", "done", step=result["steps"], status=result["status"])
        return result

    def direct(self, pretrained: dict) -> dict:
        """The pretrained checkpoint evaluated on the target: direct transfer."""
        folder = self.run_dir / "direct"
        fp = {"pretrained": _upstream(pretrained), **fingerprint(self.cfg, ("eval",))}
        action, result = self._plan("direct", folder, fp, lambda r: True)
        if action == SKIP:
            return result
        start = time.perf_counter()
        scores = self._evaluate(pretrained["checkpoint"], self.cfg)
        result = {"status": "done", "checkpoint": pretrained["checkpoint"], **scores,
                  "wall_s": time.perf_counter() - start, "fingerprint": fp}
        write_json(folder / RESULT_FILE, result)
        self.log("direct", "done")
        return result

    def variant(self, name: str, pretrained: dict) -> dict:
        """MAR variant ``name`` trained from the pretrained checkpoint, then evaluated."""
        stage = f"mar/{name}"
        folder = self.run_dir / "mar" / name
        cfg = with_overrides(self.variant_configs[name], {"output.run_dir": str(folder),
                                                          "train.pretrained_checkpoint": pretrained["checkpoint"]})
        # A given checkpoint is the whole upstream: the pretrain options did not make it.
        options = training_options(cfg)
        if pretrained["status"] == "given":
            options = tuple(o for o in options if o != "pretrain")
        # A change of evaluation options alone re-evaluates the trained model without retraining it.
        train_fp = {"pretrained": _upstream(pretrained), **fingerprint(cfg, options)}
        fp = {**train_fp, **fingerprint(cfg, ("eval",))}
        action, result = self._plan(stage, folder, fp, lambda r: _capped_done(r, cfg.train.max_steps), train_fp)
        if action == SKIP:
            return result
        if action == REEVALUATE:
            # as training would: no other run may be writing in the folder whose result this rewrites
            lock_run_dir(folder, "stage folder")
        elif action != RESUME:
            clear_stage(folder)
        with self._attempt(folder, train_fp) as elapsed:
            # the finished result of a stage to re-evaluate says how its training ended
            run = result if action == REEVALUATE else run_train(cfg, resume=action == RESUME, evaluate=False)
            self._stopped(stage, run)
            scores = self._evaluate(run["checkpoint"], cfg)
        result = {"status": run["status"], "steps": run["steps"], "checkpoint": run["checkpoint"],
                  "images_per_s": throughput(folder / "log.jsonl"), **scores, "overrides": VARIANTS[name][0],
                  "wall_s": elapsed(), "fingerprint": fp}
        write_json(folder / RESULT_FILE, result)
        self.log(stage, "done", step=result["steps"], status=result["status"])
        return result

    def _evaluate(self, checkpoint: str, cfg: Config) -> dict:
        """``evaluate_rules`` of the model a checkpoint holds, on the target."""
        state = load_checkpoint(checkpoint, trust=cfg.model.trust_checkpoint)
        model = model_from_checkpoint(state, checkpoint, cfg).to(self.device)
        return evaluate_rules(model, self.target, cfg, self.device)

    def run(self, extra: dict | None = None) -> dict:
        """Every stage in order; writes and returns ``results.json`` (``extra`` merged in) and ``results.md``."""
        start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        pretrained = self.pretrain()
        direct = self.direct(pretrained)
        variants = {name: self.variant(name, pretrained) for name in self.variant_configs}
        results = self.summary(pretrained, direct, variants)
        results["invocation_s"] = time.perf_counter() - start
        results.update(extra or {})
        write_json(self.run_dir / RESULTS_JSON, results)
        (self.run_dir / RESULTS_MD).write_text(results_markdown(results))
        return results

    def summary(self, pretrained: dict, direct: dict, variants: dict[str, dict]) -> dict:
        """What ``results.json`` holds: settings, then each stage without its fingerprint."""
        cfg = self.cfg

        def public(result: dict) -> dict:
            return {k: v for k, v in result.items() if k != "fingerprint"}

        return {
            "marreid_version": __version__,
            "ap_rule": cfg.eval.ap_rule,
            "rules": evaluation_rules(cfg),
            "distance": cfg.eval.metric,
            "backbone": cfg.model.arch,
            "input_size": [cfg.data.height, cfg.data.width],
            "device": str(self.device),
            "seed": cfg.train.seed,
            "auxiliary": {"format": cfg.data.aux_format, "root": cfg.data.aux_root, "splits": cfg.data.aux_splits},
            "target": {"format": cfg.data.target_format, "root": cfg.data.target_root},
            "pretrain": public(pretrained),
            "direct": public(direct),
            "variants": {name: {**public(result), "label": VARIANTS[name][1]} for name, result in variants.items()},
        }


def run_pipeline(cfg: Config, run_dir: str | Path, variants: Sequence[str] = ("mar",),
                 echo: Callable[[str], None] = print, extra: dict | None = None, data_version: Any = None) -> dict:
    """Run or continue every stage of ``cfg`` in ``run_dir``; the ``results.json`` contents
    (``extra`` merged in). See :class:`Pipeline`."""
    return Pipeline(cfg, run_dir, variants, echo, data_version).run(extra)


# reports ---------------------------------------------------------------------------

def result_rows(results: dict) -> dict[str, dict]:
    """``{row: {"label", "metrics", "rerank", "wall_s", "steps"}}``: direct transfer, then each
    variant; ``rerank`` is the stage's re-ranked block (``rerank_scores``), None when it has none."""
    direct = results["direct"]
    rows = {"direct": {"label": DIRECT_LABEL, "metrics": direct["metrics"], "rerank": direct.get("rerank"),
                       "wall_s": direct.get("wall_s"), "steps": None}}
    for name, result in results["variants"].items():
        rows[name] = {"label": result["label"], "metrics": result["metrics"], "rerank": result.get("rerank"),
                      "wall_s": result.get("wall_s"), "steps": result.get("steps")}
    return rows


def _reranked(rows: Sequence[dict]) -> dict | None:
    """The re-ranking settings of the first of ``rows`` (result rows or seed summaries) that was
    re-ranked; None when none was, and the tables get no re-ranked columns."""
    block = next((row["rerank"] for row in rows if row.get("rerank")), None)
    return None if block is None else {key: block[key] for key in RERANK_SETTINGS}


def _rerank_note(settings: dict) -> str:
    return (f"Re-ranked: the same features after k-reciprocal re-ranking (Zhong et al., CVPR 2017; "
            f"k1 = {settings['k1']}, k2 = {settings['k2']}, lambda = {settings['lambda']}), "
            f"under the {settings['ap_rule']} AP rule.")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def results_markdown(results: dict) -> str:
    """``results.md`` of one run: a table of direct transfer and every variant, and the settings."""
    rule, rules = results["ap_rule"], results["rules"]
    extra_rules = [r for r in rules if r != rule]
    rows = result_rows(results)
    reranked = _reranked(list(rows.values()))
    head = ["method", "rank-1", "rank-5", "rank-10", f"mAP ({rule})"] + [f"mAP ({r})" for r in extra_rules] \
        + (list(RERANK_COLUMNS.values()) if reranked else []) + ["training steps", "wall time"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for row in rows.values():
        m = row["metrics"][rule]
        cells = [row["label"], *(_percent(m[k]) for k in METRIC_KEYS)]
        cells += [_percent(row["metrics"][r]["mAP"]) for r in extra_rules]
        if reranked:
            block = row["rerank"]
            cells += [_percent(block["metrics"][k]) if block else "-" for k in RERANK_COLUMNS]
        cells += [str(row["steps"]) if row["steps"] is not None else "-", _seconds(row["wall_s"])]
        lines.append(f"| {' | '.join(cells)} |")
    pre = results["pretrain"]
    pre_text = (f"given checkpoint {pre['checkpoint']}" if pre["status"] == "given"
                else f"{pre['steps']} steps, {_seconds(pre.get('wall_s'))}")
    notes = [
        f"Backbone {results['backbone']}, input {results['input_size'][0]}x{results['input_size'][1]}, "
        f"{results['distance']} distance, seed {results['seed']}, device {results['device']}.",
        f"Auxiliary (labeled): {results['auxiliary']['root']} ({results['auxiliary']['format']}); "
        f"target (unlabeled): {results['target']['root']} ({results['target']['format']}).",
        f"Pretraining: {pre_text}. Ranks and mAP in % under the {rule} AP rule"
        + (f"; mAP also under {', '.join(extra_rules)} (the rule of the paper's numbers)." if extra_rules else "."),
    ] + ([_rerank_note(reranked)] if reranked else [])
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def aggregate_seeds(per_seed: dict[int, dict]) -> dict[str, dict]:
    """Mean and spread over seeds of every row's metrics, under every rule.

    Returns ``{row: {"label", rule: {metric: {"mean", "std", "values"}}, "wall_s": {...}}}`` for
    the rows present in every seed's results; ``std`` is the sample standard deviation
    (ddof = 1), 0 for a single seed. A row re-ranked in every seed also has ``"rerank"``:
    the first seed's settings (``"ap_rule"``, ``"k1"``, ``"k2"``, ``"lambda"``) and
    ``"metrics": {metric: {"mean", "std", "values"}}``.
    """
    rows_per_seed = [result_rows(results) for results in per_seed.values()]
    rules = next(iter(per_seed.values()))["rules"]
    common = [row for row in rows_per_seed[0] if all(row in rows for rows in rows_per_seed)]

    def stats(values: list[float]) -> dict:
        array = np.asarray(values, dtype=np.float64)
        std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}

    out: dict[str, dict] = {}
    for row in common:
        entry: dict[str, Any] = {"label": rows_per_seed[0][row]["label"]}
        for rule in rules:
            entry[rule] = {key: stats([rows[row]["metrics"][rule][key] for rows in rows_per_seed])
                           for key in METRIC_KEYS}
        blocks = [rows[row]["rerank"] for rows in rows_per_seed]
        if all(blocks):
            entry["rerank"] = {**{key: blocks[0][key] for key in RERANK_SETTINGS},
                               "metrics": {key: stats([b["metrics"][key] for b in blocks]) for key in METRIC_KEYS}}
        walls = [rows[row]["wall_s"] for rows in rows_per_seed]
        entry["wall_s"] = stats(walls) if all(w is not None for w in walls) else None
        out[row] = entry
    return out


def seeds_markdown(summary: dict[str, dict], seeds: Sequence[int], rule: str, rules: Sequence[str]) -> str:
    """The seeds table: mean ± sample std over ``seeds`` of each row, in %."""
    extra_rules = [r for r in rules if r != rule]
    reranked = _reranked(list(summary.values()))
    head = ["method", "rank-1", "rank-5", "rank-10", f"mAP ({rule})"] + [f"mAP ({r})" for r in extra_rules] \
        + (list(RERANK_COLUMNS.values()) if reranked else []) + ["wall time (mean)"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]

    def cell(stat: dict) -> str:
        text = _percent(stat["mean"])
        return text + f" ± {_percent(stat['std'])}" if len(stat["values"]) > 1 else text

    for entry in summary.values():
        cells = [entry["label"], *(cell(entry[rule][k]) for k in METRIC_KEYS)]
        cells += [cell(entry[r]["mAP"]) for r in extra_rules]
        if reranked:
            block = entry.get("rerank")
            cells += [cell(block["metrics"][k]) if block else "-" for k in RERANK_COLUMNS]
        cells.append(_seconds(entry["wall_s"]["mean"]) if entry["wall_s"] else "-")
        lines.append(f"| {' | '.join(cells)} |")
    note = (f"Mean ± sample standard deviation over seeds {', '.join(str(s) for s in seeds)} "
            f"(each seed: its own data and training seed); % under the {rule} AP rule."
            + (" " + _rerank_note(reranked) if reranked else ""))
    return "\n".join(lines) + "\n\n" + note + "\n"


__all__ = [
    "ABLATION", "COMPARISON_RULE", "VARIANTS", "Pipeline", "aggregate_seeds", "evaluate_rules",
    "evaluation_rules", "fingerprint", "parse_variants", "rerank_scores", "result_rows", "results_markdown",
    "run_pipeline", "seeds_markdown", "throughput",
]
