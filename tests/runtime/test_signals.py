"""SIGTERM / SIGINT belong to the work that saves on them, not to the process: ``StopSignal``
records them only inside its ``with`` block, and afterwards Ctrl-C is a KeyboardInterrupt again;
a Ctrl-C inside stops the caller (pytest included) as a KeyboardInterrupt once the state is saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import cdmbench.training.trainer
from cdmbench.errors import CdmbenchError, Interrupted, Stopped
from cdmbench.runtime.signals import StopSignal
from cdmbench.training.run import run

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in SIGNALS}


def assert_ctrl_c_is_a_keyboard_interrupt() -> None:
    """Python's default: SIGINT raises KeyboardInterrupt in the main thread."""
    with pytest.raises(KeyboardInterrupt) as caught:
        signal.raise_signal(signal.SIGINT)
    assert type(caught.value) is KeyboardInterrupt  # Python's own, not a recorded stop


def test_inside_the_block_signals_are_recorded_and_the_previous_handlers_come_back():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with StopSignal() as stop:
            signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: recorded
            assert stop.received == signal.SIGINT and stop.name == "SIGINT" and stop.requested()
            signal.raise_signal(signal.SIGTERM)
            assert stop.received == signal.SIGTERM and seen == []
        assert handlers() == {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: mine}
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the caller's handler again
    finally:
        signal.signal(signal.SIGTERM, before)
    assert_ctrl_c_is_a_keyboard_interrupt()


def test_the_previous_handlers_come_back_when_the_work_raises():
    before = handlers()
    with pytest.raises(ZeroDivisionError), StopSignal():
        assert handlers() != before
        raise ZeroDivisionError
    assert handlers() == before
    assert_ctrl_c_is_a_keyboard_interrupt()


def test_a_stop_by_ctrl_c_is_a_keyboard_interrupt_and_one_by_sigterm_is_not():
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGINT)
    error = stop.stopped("training x stopped by SIGINT")
    assert type(error) is Interrupted and str(error) == "training x stopped by SIGINT"
    assert isinstance(error, KeyboardInterrupt) and isinstance(error, Stopped) and isinstance(error, CdmbenchError)
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGTERM)
    assert type(stop.stopped("m")) is Stopped and not isinstance(stop.stopped("m"), KeyboardInterrupt)


def test_signals_named_in_the_environment_stop_the_work_too_and_say_which(monkeypatch):
    """A batch job's requeue signal (cdmbench launch sets $CDMBENCH_STOP_SIGNALS) is recorded as
    SIGTERM is, and the error names the signal; outside the block it is the caller's again."""
    mine = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: mine.append(signum))
    try:
        monkeypatch.setenv("CDMBENCH_STOP_SIGNALS", "usr2, SIGUSR1")
        with StopSignal() as stop:
            signal.raise_signal(signal.SIGUSR2)
        error = stop.stopped("stopped")
        assert stop.name == "SIGUSR2" and type(error) is Stopped and error.signum == signal.SIGUSR2 and mine == []
        signal.raise_signal(signal.SIGUSR2)
        assert mine == [signal.SIGUSR2]
        with StopSignal() as stop:
            signal.raise_signal(signal.SIGTERM)
        assert stop.stopped("m").signum == signal.SIGTERM
        monkeypatch.setenv("CDMBENCH_STOP_SIGNALS", "KILL")
        with pytest.raises(CdmbenchError, match=r"\$CDMBENCH_STOP_SIGNALS names 'KILL', not a signal a process can "
                                                r"catch; name signals such as USR1 or USR2"), StopSignal():
            pass
        assert handlers()[signal.SIGINT] is signal.default_int_handler  # nothing was installed
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_block_entered_twice_would_lose_the_caller_s_handlers():
    stop = StopSignal()
    with stop, pytest.raises(RuntimeError, match="not re-entrant"):
        stop.__enter__()
    assert handlers()[signal.SIGINT] is signal.default_int_handler


def test_outside_the_main_thread_nothing_is_installed():
    before, inside, errors = handlers(), [], []

    def work():
        try:
            with StopSignal() as stop:
                inside.append(handlers())
            inside.append(stop.received)
        except Exception as exc:  # noqa: BLE001 (reported by the assert below)
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == [] and inside == [before, None] and handlers() == before


def quiet(*_):
    pass


def sigint_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C (SIGINT to this process) during training step ``step`` (1-based)."""
    real, calls = cdmbench.training.trainer.Trainer.step, []

    def stepped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cdmbench.training.trainer.Trainer, "step", stepped)


@pytest.mark.slow
def test_after_a_training_ctrl_c_is_a_keyboard_interrupt_again(tiny_recipe, tmp_path, monkeypatch):
    before = handlers()
    common = dict(stage="base8", progress=False, echo=quiet, overrides=["stages.base8.train.steps=2"])
    run(tiny_recipe, out=tmp_path / "done", **common)
    assert handlers() == before
    assert_ctrl_c_is_a_keyboard_interrupt()

    # Ctrl-C during step 2 of 3: the step ends, its checkpoint is saved, and the caller gets a
    # KeyboardInterrupt that is also the stop the command line prints
    sigint_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt) as caught:
        run(tiny_recipe, out=tmp_path / "stopped", **{**common, "overrides": ["stages.base8.train.steps=3"]})
    assert isinstance(caught.value, Interrupted)
    assert "stage base8: stopped by SIGINT after step 2; its checkpoint is in" in str(caught.value)
    steps = sorted(p.name for p in (tmp_path / "stopped" / "base8" / "checkpoints").iterdir())
    assert steps == ["step-00000002"]
    assert handlers() == before
    assert_ctrl_c_is_a_keyboard_interrupt()


SUITE = '''
import os
import signal
from pathlib import Path

import torch

from cdmbench.evaluation import classifier as C

def test_trains(tmp_path):
    calls, real = [], C._augment

    def augment(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in step 3
        return real(*args)

    C._augment = augment
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    C.train_classifier(images, torch.arange(32) % 4, num_classes=4, arch="test_resnet", epochs=2, batch_size=8,
                       progress=False, state=Path(os.environ["STATE"]))

def test_after(tmp_path):
    Path(os.environ["STATE"]).with_suffix(".after").write_text("ran")
'''


@pytest.mark.slow
def test_ctrl_c_during_a_training_stops_the_test_suite(tmp_path):
    """It made the running test fail and pytest went on to the next."""
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    state = tmp_path / "state.pt"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(tmp_path / "test_suite.py")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "STATE": str(state)}, cwd=tmp_path)
    said = out.stdout + out.stderr
    assert out.returncode == pytest.ExitCode.INTERRUPTED, said
    assert "! cdmbench.errors.Interrupted: training test_resnet stopped by SIGINT after step 3 of 8" in said, said
    assert not state.with_suffix(".after").exists()  # the next test did not run
    assert torch.load(state, weights_only=True)["step"] == 3  # the state was saved first
