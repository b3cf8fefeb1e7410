"""Argument helpers shared by the training and evaluation commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marreid.config import DEVICES, Config, load_config
from marreid.errors import ConfigError


def add_config_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """CONFIG (positional, or ``--config`` when the positional slot is taken) and ``--set``."""
    if positional:
        parser.add_argument("config", nargs="?", metavar="CONFIG",
                            help="YAML configuration (defaults: the paper's recipe)")
    else:
        parser.add_argument("--config", metavar="CONFIG", help="YAML configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option, e.g. --set optim.lr=1e-4 (repeatable; YAML values)")
    parser.add_argument("--device", choices=DEVICES, help="override train.device")


def add_trust_arg(parser: argparse.ArgumentParser, what: str = "checkpoints") -> None:
    """``--trust-checkpoint``: the one way past ``torch.load(weights_only=True)``."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help=f"allow {what} that need arbitrary unpickling (only for files you trust)")


def add_rerank_arg(parser: argparse.ArgumentParser) -> None:
    """``--rerank`` of ``marreid experiment`` and ``marreid demo``: sets ``eval.rerank``."""
    parser.add_argument("--rerank", action="store_true",
                        help="also score every stage after k-reciprocal re-ranking (Zhong et al., CVPR 2017; "
                             "sets eval.rerank, with eval.rerank_k1, _k2, _lambda): re-ranked rank-1 and mAP "
                             "columns; a finished stage is evaluated again from its checkpoint, not retrained. "
                             "Costs about 3 min per evaluated stage at Market-1501 size on 2 CPU cores, "
                             "memory-bounded (under 1 GiB)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """``--run-dir``, ``--resume`` and ``--skip-bad-images``."""
    parser.add_argument("--run-dir", metavar="DIR", help="where the run's files go (overrides the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue DIR/last.pt exactly where it stopped, with the run's saved "
                             "config.yaml (plus any --set)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable images out (counted in the log) instead of stopping with an "
                             "error naming the first one (sets data.skip_bad_images)")


def resolved_config(args: argparse.Namespace, run_dir_key: str | None = None,
                    extra: list[str] | tuple = ()) -> Config:
    """The configuration a command runs with.

    CONFIG, then ``--set`` items, then the flags turned into overrides (``--device``,
    ``--run-dir`` into ``run_dir_key``, and ``extra``). With ``--resume`` the base is the
    run's saved ``config.yaml`` instead of CONFIG (which then only locates the run),
    so the resumed run continues with the settings it started with plus the overrides.
    """
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    if getattr(args, "skip_bad_images", False):
        overrides.append("data.skip_bad_images=true")
    if run_dir_key and getattr(args, "run_dir", None):
        overrides.append(f"{run_dir_key}={yaml_string(args.run_dir)}")
    overrides += list(extra)
    cfg = load_config(args.config, overrides)
    if getattr(args, "resume", False) and run_dir_key:
        section, name = run_dir_key.split(".")
        saved = Path(getattr(getattr(cfg, section), name)) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: no run to continue ({saved} not found)")
        cfg = load_config(saved, overrides)
    return cfg


def yaml_string(value: str) -> str:
    """A path or name quoted so ``--set`` parses it back as the same string."""
    return json.dumps(str(value))


def stopped_by_signal(command: str, result: dict) -> int | None:
    """For a run a signal stopped: a note on stderr and the exit status 128 + the signal's number
    (the shell's convention for a signal); None when the run was not stopped by one."""
    from marreid.engine.signals import signal_name

    signum = result.get("signal")
    if result["status"] != "stopped" or not signum:
        return None
    print(f"marreid {command}: stopped by {signal_name(signum)}; checkpoint written to {result['checkpoint']}, "
          f"continue with --resume", file=sys.stderr)
    return 128 + signum


def print_metrics(metrics: dict) -> None:
    """rank-1/5/10 and mAP as percentages, naming the AP rule."""
    print(f"rank-1 {100 * metrics['rank1']:.1f}  rank-5 {100 * metrics['rank5']:.1f}  "
          f"rank-10 {100 * metrics['rank10']:.1f}  mAP {100 * metrics['mAP']:.1f} "
          f"(AP rule: {metrics['ap_rule']}; {metrics['num_query']} queries, "
          f"{metrics['num_gallery']} gallery images)")


def output_dir(args: argparse.Namespace) -> Path:
    """``--out``, or else the folder of the ``checkpoint`` argument."""
    return Path(args.out) if args.out else Path(args.checkpoint).parent


def check_output(path: str | Path, option: str, folder: bool = False) -> Path:
    """``path`` as an output file (``folder``: an output folder), refused before any work starts
    when it cannot become one: a folder where a file is wanted or the reverse, or a file
    where one of its parent folders would have to be."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        wanted = "a folder" if folder else "a file name"
        raise ConfigError(f"{option}: {path} is {'a file' if folder else 'a folder'}; give {wanted}")
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"{option}: cannot create {path}: {parent} is a file, not a folder")
    return path


def checkpoint_config(args: argparse.Namespace, checkpoint: str) -> tuple[Config, dict]:
    """The loaded ``checkpoint`` and the configuration to run it with: its own unless
    ``--config``, then ``--set``, ``--device`` and ``--trust-checkpoint``. Its weights must
    be finite: a diverged run's NaN would otherwise surface as NaN distances or features."""
    from marreid.config import config_from_dict
    from marreid.engine.checkpoint import load_checkpoint

    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    trust = getattr(args, "trust_checkpoint", False)
    if trust:
        overrides.append("model.trust_checkpoint=true")
    state = load_checkpoint(checkpoint, trust=trust, finite=True)
    if args.config or "config" not in state:
        return load_config(args.config, overrides), state
    return config_from_dict(state["config"], overrides, where=f"{checkpoint} (its configuration)"), state


__all__ = ["add_config_args", "add_run_args", "add_trust_arg", "resolved_config", "yaml_string", "print_metrics",
           "checkpoint_config", "stopped_by_signal", "output_dir", "check_output"]
