"""Faults around a run's state: a non-finite loss or weights, untrusted pickles, an unwritable or
full disk, a fresh run over a checkpoint, a resume at another input size. Each is one line
on stderr with exit status 2, and the last good checkpoint stays intact and resumable."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import warnings
from collections import namedtuple

import pytest
import torch

from marreid.cli import main
from marreid.engine import checkpoint as checkpoint_module
from marreid.engine import preflight
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.logging import RunLogger, read_log
from marreid.engine.train import MARTrainer
from marreid.models import build_model
from test_robustness_helpers import AUX_IDS, cli, make_run_data

STEPS = 4  # two epochs of two steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_run_data(tmp_path_factory.mktemp("robust_ckpt"))


def train_args(data, run_dir, *extra):
    return ["train", data["config"], "--run-dir", run_dir, "--set", "optim.epochs=2", *extra]


def resumed_at(run_dir) -> list[int]:
    return [r["resumed_at"] for r in read_log(run_dir / "log.jsonl") if "resumed_at" in r]


def assert_finite(state: dict) -> None:
    for name, value in state["model"].items():
        assert torch.isfinite(value.float()).all(), name


def test_non_finite_loss_stops_keeps_the_checkpoint_and_resumes(data, tmp_path, capsys, monkeypatch):
    compute = MARTrainer.compute_loss

    def poisoned(self, epoch, aux_batch, target_batch):
        total, terms = compute(self, epoch, aux_batch, target_batch)
        if self.step == 3:
            return total * float("nan"), {**terms, "loss": float("nan"), "cml": float("nan")}
        return total, terms

    monkeypatch.setattr(MARTrainer, "compute_loss", poisoned)
    code, err = cli(capsys, *train_args(data, tmp_path, "--set", "train.checkpoint_every_steps=1"))
    assert code == 2 and err == [
        f"marreid train: error: non-finite loss terms 'loss' (nan), 'cml' (nan) at step 3; stopped, the last good "
        f"checkpoint {tmp_path / 'last.pt'} is kept (fix the cause, e.g. a lower learning rate, and continue "
        f"with --resume)"]
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["step"] == 3
    assert_finite(kept)

    monkeypatch.undo()
    code, err = cli(capsys, "train", "--run-dir", tmp_path, "--resume")
    assert code == 0
    assert resumed_at(tmp_path) == [0, 3]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == STEPS


def test_non_finite_weights_are_never_saved(data, tmp_path, capsys, monkeypatch):
    step = torch.optim.SGD.step
    calls = []

    def poisoning_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    code, err = cli(capsys, *train_args(data, tmp_path, "--set", "train.checkpoint_every_steps=1"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("marreid train: error: non-finite weights in backbone.")
    assert err[0].endswith(f"after step 2; not saved, the last good checkpoint {tmp_path / 'last.pt'} is kept")
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["step"] == 1
    assert_finite(kept)


class TouchOnLoad:
    """Pickles as a call to ``Path.touch``: proof of arbitrary code running when unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickled_weights_are_refused_unless_trusted(data, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    weights = build_model("tiny", AUX_IDS, 30.0).state_dict()
    authors = tmp_path / "authors_trainer.pt"
    torch.save({"state_dict": weights, "trainer": TouchOnLoad(marker)}, authors)

    code, err = cli(capsys, "train", data["config"], "--run-dir", tmp_path / "mar", "--pretrained", authors)
    assert code == 2 and len(err) == 1
    assert str(authors) in err[0] and "pass --trust-checkpoint" in err[0] and "arbitrary code" in err[0]
    code, err = cli(capsys, "pretrain", data["config"], "--run-dir", tmp_path / "pre",
                    "--set", f"model.pretrained={authors}")
    assert code == 2 and len(err) == 1
    assert str(authors) in err[0] and "pass --trust-checkpoint" in err[0]
    assert not marker.exists()

    code, err = cli(capsys, "pretrain", data["config"], "--run-dir", tmp_path / "pre",
                    "--set", f"model.pretrained={authors}", "--trust-checkpoint")
    assert code == 0 and marker.exists()


class SystemOnLoad:
    """Pickles as a call to ``os.system``: a shell command run by whoever unpickles it."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["torch zip", "raw pickle", "raw pickle protocol 2"])
def test_code_running_checkpoint_is_refused_with_the_trust_hint(tmp_path, capsys, form):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"model": SystemOnLoad(marker)}
    if form == "torch zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2 if form.endswith("2") else pickle.DEFAULT_PROTOCOL))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = cli(capsys, "evaluate", path)
    assert (code, err) == (2, [f"marreid evaluate: error: refusing to load {path}: it holds pickled Python objects, "
                               f"which can run arbitrary code when loaded; pass --trust-checkpoint, but only for "
                               f"a file whose origin you trust"])
    assert not caught  # torch's warning about a raw pickle's protocol is not shown
    assert not marker.exists()


def nan_copy(source: pathlib.Path, dest: pathlib.Path, count: int) -> list[str]:
    """``source`` with its first ``count`` weights set to NaN, written to ``dest``; their names."""
    state = load_checkpoint(source)
    names = [name for name, value in state["model"].items() if value.is_floating_point()][:count]
    for name in names:
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, dest)
    return [f"model.{name}" for name in names]


@pytest.mark.parametrize("command", ["evaluate", "extract"])
def test_non_finite_checkpoint_is_refused_for_evaluation_naming_its_tensors(data, tmp_path, capsys, command):
    bad = tmp_path / "diverged.pt"
    names = nan_copy(data["pre"] / "last.pt", bad, 5)
    extra = ["--split", "query", "--out", tmp_path / "f.npz"] if command == "extract" else []
    code, err = cli(capsys, command, bad, *extra)
    assert (code, err) == (2, [f"marreid {command}: error: {bad}: non-finite values (NaN or inf) in 5 tensor(s): "
                               f"{', '.join(names[:3])} and 2 more; use a checkpoint from before the run diverged"])


def test_non_finite_pretrained_checkpoint_is_refused_before_the_first_step(data, tmp_path, capsys):
    bad = tmp_path / "diverged.pt"
    (name,) = nan_copy(data["pre"] / "last.pt", bad, 1)
    run_dir = tmp_path / "mar"
    code, err = cli(capsys, "train", data["config"], "--run-dir", run_dir, "--pretrained", bad)
    assert (code, err) == (2, [f"marreid train: error: {bad}: non-finite values (NaN or inf) in 1 tensor(s): {name}; "
                               f"use a checkpoint from before the run diverged"])
    assert not (run_dir / "last.pt").exists() and not read_log(run_dir / "log.jsonl", "step")


@pytest.mark.parametrize("case", ["under a file", "read-only", "pretrain under a file"])
def test_unwritable_run_folder_is_refused_first(data, tmp_path, capsys, monkeypatch, case):
    command, key = ("pretrain", "output.pretrain_dir") if case.startswith("pretrain") else ("train", "output.run_dir")
    if case == "read-only":
        run_dir, reason = tmp_path / "ro", "Read-only file system"

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, reason)

        monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    else:
        (tmp_path / "file").write_text("a file, not a folder")
        run_dir, reason = tmp_path / "file" / "run", "Not a directory"
    code, err = cli(capsys, command, data["config"], "--run-dir", run_dir)
    assert (code, err) == (2, [f"marreid {command}: error: {key}: cannot write to {run_dir} ({reason})"])


def test_too_little_free_space_is_refused_before_training(data, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    code, err = cli(capsys, *train_args(data, tmp_path))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"marreid train: error: output.run_dir: {tmp_path} has 1 MiB free, its checkpoints need")
    assert not (tmp_path / "last.pt").exists() and not read_log(tmp_path / "log.jsonl", "step")


# SGD keeps one buffer per parameter, cluster contrast's Adam two
CLUSTER_CONTRAST = ("--set", "train.method=cluster_contrast", "--set", "train.bn_batch=null", "--set", "cc.epochs=1",
                    "--set", "cc.iters_per_epoch=2", "--set", "cc.batch_size=4", "--set", "cc.instances=2",
                    "--set", "cc.k1=4", "--set", "cc.k2=2", "--set", "cc.min_samples=2", "--set", "cc.eps=0.9")


@pytest.mark.parametrize("method", [(), CLUSTER_CONTRAST], ids=["mar", "cluster_contrast"])
def test_checkpoint_estimate_bounds_the_real_file(data, tmp_path, capsys, monkeypatch, method):
    estimates = []
    check = preflight.check_free_space
    monkeypatch.setattr(preflight, "check_free_space", lambda run_dir, need, key: estimates.append(need) or check(
        run_dir, need, key))
    assert cli(capsys, *train_args(data, tmp_path, *method))[0] == 0
    size = (tmp_path / "last.pt").stat().st_size  # holds the optimiser's buffers by now
    (need,) = estimates
    assert size <= need <= 2 * size + preflight.SIZE_SLACK


# How a full disk surfaces from torch.save: as the file's own OSError, or (torch 2.x's zip writer,
# after a short write) as a RuntimeError; and the reason the one-line error then gives.
WRITE_FAILURES = {
    "OSError": (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    "zip writer": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                   "the write failed, is the disk full? ([enforce fail at inline_container.cc:672] . "
                   "unexpected pos 704 vs 598)"),
}


@pytest.mark.parametrize("failure", WRITE_FAILURES)
def test_failed_checkpoint_write_keeps_the_previous_one(data, tmp_path, capsys, monkeypatch, failure):
    error, reason = WRITE_FAILURES[failure]
    save, calls, previous = torch.save, [], []

    def disk_fills(obj, fh):
        calls.append(1)
        if len(calls) == 2:
            previous.append((tmp_path / "last.pt").read_bytes())
            fh.write(b"PK\x03\x04 the first bytes of a checkpoint")
            raise error
        save(obj, fh)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_fills)
    code, err = cli(capsys, *train_args(data, tmp_path, "--set", "train.checkpoint_every_steps=1"))
    assert (code, err) == (2, [f"marreid train: error: cannot write checkpoint {tmp_path / 'last.pt'} "
                               f"({reason}); the previous one is kept"])
    assert (tmp_path / "last.pt").read_bytes() == previous[0]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 0  # the fresh run's first checkpoint
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]

    monkeypatch.undo()
    assert cli(capsys, "train", "--run-dir", tmp_path, "--resume")[0] == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == STEPS


def test_disk_full_elsewhere_is_one_line(data, tmp_path, capsys, monkeypatch):
    log = RunLogger.log

    def full(self, kind, record, step=None):
        if kind == "step":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        log(self, kind, record, step)

    monkeypatch.setattr(RunLogger, "log", full)
    code, err = cli(capsys, *train_args(data, tmp_path))
    assert (code, err) == (2, [f"marreid train: error: No space left on device: {tmp_path / 'log.jsonl'}"])


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    assert main([str(a) for a in train_args(data, run_dir)]) == 0
    return run_dir


def test_fresh_run_over_a_checkpoint_is_refused(data, finished, capsys):
    before = (finished / "last.pt").read_bytes()
    code, err = cli(capsys, *train_args(data, finished))
    assert (code, err) == (2, [f"marreid train: error: output.run_dir: {finished} already holds last.pt; "
                               f"continue that run with --resume, or choose another run folder"])
    assert (finished / "last.pt").read_bytes() == before


def test_resume_at_another_input_size_is_refused(finished, capsys):
    saved_config = (finished / "config.yaml").read_text()
    code, err = cli(capsys, "train", "--run-dir", finished, "--resume", "--set", "data.height=64")
    assert (code, err) == (2, [f"marreid train: error: {finished / 'last.pt'}: trained at 32x16 "
                               f"(data.height x data.width), this run asks for 64x16; resume at the size it was "
                               f"trained at"])
    assert (finished / "config.yaml").read_text() == saved_config  # the refused override was not kept


def test_partial_checkpoints_are_removed_when_a_run_starts(finished, capsys):
    partial = finished / ".last.pt.k3j2x.tmp"
    partial.write_bytes(b"half a checkpoint")
    assert cli(capsys, "train", "--run-dir", finished, "--resume")[0] == 0
    assert not partial.exists() and load_checkpoint(finished / "last.pt")["step"] == STEPS


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: torch.optim.Adam(ps, lr=0.1)], ids=["sgd", "adam"])
def test_checkpoint_estimate_counts_the_optimisers_buffers(make):
    model = torch.nn.Linear(300, 200)
    optimizer = make(model.parameters())
    before = preflight.checkpoint_estimate({"model": model.state_dict()}, model, preflight.optimizer_buffers(optimizer))
    model(torch.ones(2, 300)).sum().backward()
    optimizer.step()
    after = preflight.state_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert after <= before - preflight.SIZE_SLACK <= 1.1 * after
