"""``marreid demo``: synthetic data -> pretraining -> direct transfer -> MAR, and one table.

The settings live in ``configs/demo.yaml``: a run configuration plus a
``synthetic`` section for the generator (its seed comes from ``--seeds``).
Each seed has its own data (``RUN/data/seed_S``) and run folder
(``RUN/seed_S``); re-running skips what is finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from marreid.cli import demo_expected
from marreid.cli.common import add_config_args, add_rerank_arg, yaml_string
from marreid.config import Config, config_from_dict
from marreid.data.synthetic import SyntheticConfig, generate, read_params
from marreid.engine.variants import known_variants
from marreid.errors import ConfigError, DatasetError

DEMO_CONFIG = Path("configs") / "demo.yaml"
SYNTHETIC_SECTION = "synthetic"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the synthetic-data demo: direct transfer vs MAR in one table (ablation, several seeds)",
        description="Generates the synthetic auxiliary and target camera networks, pretrains on the "
                    "auxiliary one, evaluates direct transfer on the target, trains MAR and evaluates it, "
                    "and prints the table (also written to RUN/results.md and results.json). "
                    "`marreid demo ablation` (or --ablation) adds the variants without L_CML, without "
                    "L_MDL, without L_RJ and with hard labels, all from the same pretrained model.",
    )
    parser.add_argument("mode", nargs="?", choices=("ablation",), help="ablation: train the ablation variants too")
    parser.add_argument("--ablation", action="store_true", help="same as the `ablation` mode")
    parser.add_argument("--seeds", type=_count, default=1, metavar="N",
                        help="repeat with seeds 0..N-1 (data and training) and report mean and spread")
    parser.add_argument("--variants", metavar="V1,V2", help="MAR variants to train instead (default: mar, or the "
                        f"ablation set); known: {known_variants()}")
    parser.add_argument("--run-dir", default="runs/demo", metavar="DIR", help="run folder (default %(default)s)")
    parser.add_argument("--threads", type=_count, metavar="N",
                        help="CPU threads for torch (default: torch's own, the cores this machine offers; "
                             "on a machine busy with something else, 1 can be several times faster). "
                             "A seed's exact numbers depend on it")
    add_rerank_arg(parser)
    add_config_args(parser, positional=False)
    parser.set_defaults(func=run)


def default_config_path() -> Path:
    """configs/demo.yaml of the current folder, else the one of the source tree marreid runs from."""
    if DEMO_CONFIG.is_file():
        return DEMO_CONFIG
    return Path(__file__).resolve().parents[3] / DEMO_CONFIG


def read_demo_config(path: str | Path, overrides: list[str]) -> tuple[dict, dict, list[str]]:
    """``(run configuration dict, synthetic generator dict, run overrides)`` from the demo YAML;
    ``--set synthetic.KEY=VALUE`` items go to the generator."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"demo configuration not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    synthetic = data.pop(SYNTHETIC_SECTION, None) or {}
    if not isinstance(synthetic, dict):
        raise ConfigError(f"{path}: '{SYNTHETIC_SECTION}' must be a mapping of generator options")
    rest = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if key.strip().startswith(SYNTHETIC_SECTION + "."):
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            synthetic[key.strip()[len(SYNTHETIC_SECTION) + 1:]] = yaml.safe_load(raw)
        else:
            rest.append(item)
    if "seed" in synthetic:
        raise ConfigError(f"{path}: {SYNTHETIC_SECTION}.seed is set by --seeds, leave it out")
    return data, synthetic, rest


def ensure_synthetic(folder: Path, config: SyntheticConfig) -> float:
    """The synthetic dataset of ``config`` in ``folder``: reused when it is there and complete,
    else (re)generated. Returns the seconds spent generating."""
    try:
        params = read_params(folder)
    except DatasetError:
        params = None
    if params is not None and params.get("complete") and params["config"] == config:
        return 0.0
    start = time.perf_counter()
    generate(folder, config, overwrite=params is not None)
    return time.perf_counter() - start


def seed_configs(config_path: Path, overrides: list[str], run_dir: Path, seeds: int
                 ) -> list[tuple[int, Path, SyntheticConfig, Config]]:
    """``(seed, data folder, generator config, run config)`` of every seed, all checked before
    anything runs: seed S draws its data with seed S and trains with seed S."""
    base, synthetic, overrides = read_demo_config(config_path, overrides)
    plans = []
    for seed in range(seeds):
        data_dir = run_dir / "data" / f"seed_{seed}"
        generator = SyntheticConfig.from_dict({**synthetic, "seed": seed})
        cfg = config_from_dict(base, overrides + [
            f"data.aux_root={yaml_string(data_dir / 'auxiliary')}",
            f"data.target_root={yaml_string(data_dir / 'target')}",
            f"train.seed={seed}",
        ], where=str(config_path))
        plans.append((seed, data_dir, generator, cfg))
    return plans


def shipped_settings(args: argparse.Namespace) -> bool:
    """Whether this run uses the shipped demo settings, the ones the expected range was measured with."""
    return not args.config and not args.overrides


def expected_comparison(summary: dict, rule: str) -> tuple[list[dict], str]:
    """This run's rank-1 and mAP against the shipped expected range: (entries, markdown)."""
    expected = demo_expected.load_expected()
    entries = demo_expected.compare(demo_expected.expected_rows(summary, rule), expected)
    return entries, demo_expected.comparison_markdown(entries, expected)


def run(args: argparse.Namespace) -> int:
    import torch

    from marreid.engine import pipeline

    start = time.perf_counter()
    ablation = args.ablation or args.mode == "ablation"
    variants = pipeline.parse_variants(args.variants) if args.variants else \
        list(pipeline.ABLATION if ablation else ("mar",))
    config_path = Path(args.config) if args.config else default_config_path()
    # --rerank leaves the non-re-ranked numbers as they are, so unlike --set it keeps the expected range.
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else []) \
        + (["eval.rerank=true"] if args.rerank else [])
    run_dir = Path(args.run_dir)
    plans = seed_configs(config_path, overrides, run_dir, args.seeds)

    def echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    per_seed = {}
    threads = torch.get_num_threads()
    demo_threads = args.threads or threads
    hint = demo_expected.busy_hint(demo_threads, *demo_expected.machine_load())
    echo(f"[threads] torch uses {demo_threads} CPU threads" + (f"\n{hint}" if hint else ""))
    torch.set_num_threads(demo_threads)
    try:
        for seed, data_dir, generator, cfg in plans:
            echo(f"== seed {seed}: synthetic data in {data_dir}")
            seconds = ensure_synthetic(data_dir, generator)
            echo(f"[data] generated in {seconds:.0f} s" if seconds else "[data] generated earlier: reused")
            per_seed[seed] = pipeline.run_pipeline(cfg, run_dir / f"seed_{seed}", variants, echo=echo,
                                                   extra={"synthetic": generator.to_dict(), "generate_s": seconds},
                                                   data_version=generator.to_dict())
    finally:
        torch.set_num_threads(threads)
    summary = pipeline.aggregate_seeds(per_seed)
    first = per_seed[0]
    wall = time.perf_counter() - start
    report = {"seeds": list(per_seed), "variants": variants, "ap_rule": first["ap_rule"], "rules": first["rules"],
              "summary": summary, "runs": {seed: str(run_dir / f"seed_{seed}") for seed in per_seed},
              "threads": demo_threads, "machine": demo_expected.machine(), "invocation_s": wall}
    if len(per_seed) == 1:
        table = pipeline.results_markdown(first)
    else:
        table = pipeline.seeds_markdown(summary, list(per_seed), first["ap_rule"], first["rules"])
    if shipped_settings(args):
        report["expected"], text = expected_comparison(summary, first["ap_rule"])
        table += "\n" + text
    else:
        table += "\nNo expected range: these settings differ from the shipped demo's (--config or --set).\n"
    (run_dir / pipeline.RESULTS_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / pipeline.RESULTS_MD).write_text(table)
    print(table, end="")
    print(f"\nwall time {wall / 60:.1f} min; results: {run_dir / pipeline.RESULTS_MD}, "
          f"{run_dir / pipeline.RESULTS_JSON}")
    return 0
