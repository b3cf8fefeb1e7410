"""Real signals to a real ``marreid train`` process: SIGKILL mid-epoch and mid-write, SIGINT /
SIGTERM (to the whole process group, DataLoader worker included), a second signal.

Each run is a forked child process in a session of its own that arms one fault at
an exact point (the start of a given step, or halfway through writing a given
checkpoint), then calls the CLI; forking skips a fresh interpreter's imports. All
runs use one CPU thread, so a resumed run must reproduce the uninterrupted one bit
for bit.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import pytest
import torch

from fakedata import make_market_tree, write_tiny_config
from marreid.cli import main
from marreid.data import loaders
from marreid.engine import checkpoint
from marreid.engine.checkpoint import load_checkpoint
from marreid.engine.logging import read_log
from marreid.engine.signals import StopOnSignals
from marreid.engine.train import MARTrainer

STEPS_PER_EPOCH = 3  # 24 auxiliary images in batches of 8
EPOCHS = 2
SEED = 0
CHILD_FAILED = 99


def arm(fault: str, at: int) -> None:
    """In the child: die halfway through checkpoint write number ``at``; SIGKILL itself, or send
    SIGINT twice to its group, at the start of step ``at``; or (``SIGINT`` / ``SIGTERM``) have its
    DataLoader worker send the signal to the group while loading the first batch of epoch ``at``,
    when the main process is waiting for that batch."""
    if fault == "kill-in-write":
        save, calls = torch.save, []

        def half_then_kill(obj, fh):
            calls.append(1)
            if len(calls) == at:
                buffer = io.BytesIO()
                save(obj, buffer)
                fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            save(obj, fh)

        checkpoint.torch.save = half_then_kill
        return
    if fault in ("SIGINT", "SIGTERM"):
        get_item = loaders._PairedItems.__getitem__
        first_of_epoch = loaders.sample_seed(SEED, at, 0, 0, loaders.AUX_STREAM)

        def signalling(self, item):
            if item[2] == first_of_epoch:
                os.killpg(0, getattr(signal, fault))
            return get_item(self, item)

        loaders._PairedItems.__getitem__ = signalling
        return
    compute_loss = MARTrainer.compute_loss

    def faulty(self, *args):
        if self.step == at:
            if fault == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            for _ in range(2):
                os.killpg(0, signal.SIGINT)
                time.sleep(0.05)  # two signals pending at once would merge into one
        return compute_loss(self, *args)

    MARTrainer.compute_loss = faulty


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, a config with one DataLoader worker, and a pretrained checkpoint (in-process)."""
    root = tmp_path_factory.mktemp("signals")
    make_market_tree(root / "aux", ids=6, cams=2, per_id=4, size=(32, 16), junk=0, distractors=0)
    make_market_tree(root / "tgt", ids=4, cams=3, per_id=4, size=(32, 16), seed=1)
    config = write_tiny_config(root / "tiny.yaml", root / "aux", root / "tgt", data={"num_workers": 1},
                               optim={"epochs": EPOCHS, "lr": 0.05},
                               train={"seed": SEED, "pretrained_checkpoint": str(root / "pre" / "last.pt")})
    assert main(["pretrain", str(config), "--run-dir", str(root / "pre"), "--set", "data.num_workers=0"]) == 0
    return {"root": root, "config": config}


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def launch(setup, run_dir, fault="none", at=-1, resume=False, timeout=120.0) -> Outcome:
    """``marreid train`` in a forked child (its own session and process group), ``fault`` armed at ``at``."""
    argv = ["train", "--run-dir", str(run_dir), "--resume"] if resume else ["train", str(setup["config"]),
                                                                             "--run-dir", str(run_dir)]
    logs = setup["root"] / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"{run_dir.name}.out", logs / f"{run_dir.name}.err"
    pid = os.fork()
    if pid == 0:
        code = CHILD_FAILED
        try:
            os.setsid()
            sys.stdout, sys.stderr = out.open("w", buffering=1), err.open("w", buffering=1)
            torch.set_num_threads(1)
            if fault != "none":
                arm(fault, at)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"marreid train {' '.join(argv)} did not finish in {timeout} s")
        time.sleep(0.05)
    return Outcome(os.waitstatus_to_exitcode(status), out.read_text(), err.read_text())


def final_state(run_dir) -> tuple[dict, dict]:
    return json.loads((run_dir / "metrics.json").read_text()), load_checkpoint(run_dir / "last.pt")


def assert_same_run(run_dir, reference) -> None:
    metrics, state = final_state(run_dir)
    ref_metrics, ref_state = reference
    for key in ("rank1", "rank5", "rank10", "mAP"):
        assert metrics[key] == ref_metrics[key], key
    assert state["step"] == ref_state["step"] == EPOCHS * STEPS_PER_EPOCH
    for name, value in ref_state["model"].items():
        assert torch.equal(value, state["model"][name]), name
    for name, value in ref_state["loss"].items():
        assert torch.equal(value, state["loss"][name]), name


@pytest.fixture(scope="module")
def uninterrupted(setup):
    run_dir = setup["root"] / "uninterrupted"
    done = launch(setup, run_dir)
    assert done.returncode == 0, done.stderr
    return final_state(run_dir)


def test_sigkill_mid_epoch_and_mid_write_then_resume_ends_identical(setup, uninterrupted, tmp_path):
    # Killed at the start of step 4 (epoch 1, step 1): last.pt is the end of epoch 0.
    killed = launch(setup, tmp_path, "SIGKILL", at=4)
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "last.pt")["step"] == STEPS_PER_EPOCH

    # Resumed, then killed halfway through writing its first checkpoint (the end of epoch 1).
    killed = launch(setup, tmp_path, "kill-in-write", at=1, resume=True)
    assert killed.returncode == -signal.SIGKILL
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".last.pt.")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == STEPS_PER_EPOCH  # still the complete one

    resumed = launch(setup, tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not partial[0].exists()
    assert_same_run(tmp_path, uninterrupted)
    starts = [r["resumed_at"] for r in read_log(tmp_path / "log.jsonl") if "resumed_at" in r]
    assert starts == [0, STEPS_PER_EPOCH, STEPS_PER_EPOCH]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_checkpoints_exits_cleanly_and_resumes(setup, uninterrupted, tmp_path, sig):
    # Sent to the group (main process and worker) while the worker loads step 3, the first of epoch 1.
    stopped = launch(setup, tmp_path, sig.name, at=1)
    assert stopped.returncode == 128 + sig
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines() == [
        f"marreid train: stopped by {sig.name}; checkpoint written to {tmp_path / 'last.pt'}, continue with --resume"]
    assert "train stopped after 4 steps" in stopped.stdout
    # The step under way (3) was finished and saved; nothing was evaluated.
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert not (tmp_path / "metrics.json").exists()

    resumed = launch(setup, tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, uninterrupted)


def test_second_signal_interrupts_at_once(setup, tmp_path):
    interrupted = launch(setup, tmp_path, "SIGINT-twice", at=4)
    assert interrupted.returncode == 130
    assert interrupted.stderr.strip().splitlines() == ["marreid train: interrupted"]
    # No checkpoint of the unfinished step: last.pt is still the end of epoch 0.
    assert load_checkpoint(tmp_path / "last.pt")["step"] == STEPS_PER_EPOCH


class Stoppable:
    stop_requested = False


def deliver(sig: int) -> None:
    """Send ``sig`` to this process and let Python run its handler."""
    os.kill(os.getpid(), sig)
    time.sleep(0.01)


def test_handlers_flag_then_interrupt_then_restore():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer = Stoppable()
    with StopOnSignals(trainer) as stop:
        deliver(signal.SIGTERM)
        assert trainer.stop_requested and stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        trainer = Stoppable()
        with StopOnSignals(trainer) as stop:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            deliver(signal.SIGTERM)
            assert not trainer.stop_requested and stop.received is None
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
