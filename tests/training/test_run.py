import contextlib
import itertools
import json
import re
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import cdmbench.cascade.stages
import cdmbench.training.run
import cdmbench.training.trainer
from cdmbench.cascade.cost import describe
from cdmbench.cli import cli
from cdmbench.errors import CdmbenchError
from cdmbench.recipe.load import load_recipe
from cdmbench.training.run import run
from tests.builtin.test_unet import attention, conv, gn, linear, resblock


def test_cli_run_end_to_end_writes_grids_results_and_report(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(tiny_recipe), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert re.search(r"train sr16 step 4/4: loss \d\.\d{4}, \d+ img/s, 0m00s left", result.output)  # no bar: log lines
    for stage in ("base8", "sr16"):
        assert (out / stage / "samples" / "grid.png").stat().st_size > 0
        assert (out / stage / "checkpoints" / "step-00000004" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    metrics = {(r["stage"], r["metric"]) for r in rows}
    for stage in ("base8", "sr16"):
        assert {(stage, "train_loss"), (stage, "train_throughput"), (stage, "sample_time")} <= metrics
    assert all(r["status"] == "ok" and r["value"] > 0 for r in rows)
    run_yaml = (out / "run.yaml").read_text()
    assert "cdmbench.builtin.unet" in run_yaml and "torch:" in run_yaml
    # The checkpoint embeds the resolved recipe.
    from safetensors import safe_open
    with safe_open(out / "base8" / "checkpoints" / "step-00000004" / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["recipe"])["name"] == "tiny"
    report = CliRunner().invoke(cli, ["report", str(out), "--csv", str(tmp_path / "all.csv"),
                                      "--out", str(tmp_path / "exported")])
    assert report.exit_code == 0 and "sr16" in report.output and "train_loss" in report.output
    # Every row as a flat table: one column per protocol field, nested values as JSON.
    import pandas as pd

    flat = pd.read_csv(tmp_path / "all.csv")
    assert len(flat) == len(rows) and set(flat["stage"]) == {"base8", "sr16"}
    grid = flat[(flat["stage"] == "sr16") & (flat["metric"] == "sample_time")].iloc[0]
    assert grid["protocol.precision"] == "fp32" and json.loads(grid["protocol.sampler_args"]) == {"steps": 4}
    assert pd.read_csv(tmp_path / "exported" / "results.csv").equals(flat)
    # The training section: each stage's last log row, and the loss curves it plots.
    text = (out / "report.md").read_text()
    section = text.split("## Training")[1].split("##")[0]
    for stage in ("base8", "sr16"):
        last = json.loads((out / stage / "train_log.jsonl").read_text().splitlines()[-1])
        assert re.search(rf"\| {stage}\s*\| 4\s*\| {last['loss']:.4g}\s*\|", section)
    assert "![training loss](training.png)" in section and (out / "training.png").stat().st_size > 0


def test_batches_walk_one_permutation_per_epoch_across_epoch_boundaries():
    from cdmbench.cascade.stages import derive_seed
    from cdmbench.training.trainer import batch_indices

    walked = torch.cat([batch_indices(10, 4, step, seed=3, stage_index=1) for step in range(5)])
    epochs = [torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(3, 1, e))) for e in (0, 1)]
    assert torch.equal(walked, torch.cat(epochs))  # step 2 takes the end of epoch 0 and the start of epoch 1
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(batch_indices(10, 4, 2, seed=3, stage_index=1), walked[8:12])  # resuming at a step


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_recipe, tmp_path):
    common = dict(stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, out=tmp_path / "a", **common)
    run(tiny_recipe, out=tmp_path / "b", overrides=["stages.base8.train.steps=2"], **common)
    assert not (tmp_path / "b" / "base8" / "checkpoints" / "step-00000004").exists()
    run(tiny_recipe, out=tmp_path / "b", **common)  # the same command again resumes at step 2
    for name in ("model", "ema"):
        a = load_file(tmp_path / "a" / "base8" / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        b = load_file(tmp_path / "b" / "base8" / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "b" / "base8" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    seconds = [r["seconds"] for r in log]  # training time accumulates across the resume
    assert all(0 < a < b for a, b in itertools.pairwise(seconds))


def test_cudnn_benchmark_follows_the_recipe_and_may_change_on_resume(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    run(tiny_recipe, out=tmp_path / "r", stage="base8", progress=False, echo=lambda *_: None,
        overrides=["stages.base8.train.steps=2"])
    assert torch.backends.cudnn.benchmark is True  # the default
    run(tiny_recipe, out=tmp_path / "r", stage="base8", progress=False, echo=lambda *_: None,
        overrides=["stages.base8.train.steps=3", "stages.base8.train.cudnn_benchmark=false"])
    assert torch.backends.cudnn.benchmark is False


def test_a_different_recipe_in_the_same_run_directory_is_refused(tiny_recipe, tmp_path):
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=1"], **common)
    with pytest.raises(CdmbenchError, match=r"different recipe \(stages.base8.train.lr: 0.001 -> 0.01\)"):
        run(tiny_recipe, overrides=["stages.base8.train.lr=0.01"], **common)


def test_a_different_recipe_is_refused_before_the_data_is_built(tiny_recipe, tmp_path, monkeypatch):
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=1"], **common)

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was built before the recipe was checked")

    monkeypatch.setattr(cdmbench.training.run, "make_dataset", no_data)  # a Hub dataset takes minutes
    with pytest.raises(CdmbenchError, match="different recipe"):
        run(tiny_recipe, overrides=["stages.base8.train.lr=0.01"], **common)


@pytest.mark.parametrize("log_every", [1, 4])  # 4: the loss of step 3 is read after step 4
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_recipe, tmp_path, monkeypatch, log_every):
    real = cdmbench.training.trainer.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(cdmbench.training.trainer, "diffusion_loss", poisoned)
    with pytest.raises(CdmbenchError, match="loss is nan at step 3; lower train.lr"):
        run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None,
            overrides=[f"stages.base8.train.log_every={log_every}"])
    checkpoints = tmp_path / "a" / "base8" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]  # none of spoiled weights
    assert torch.isfinite(load_file(checkpoints / "step-00000002" / "model.safetensors")["input_conv.weight"]).all()


def test_non_finite_gradients_of_a_finite_loss_stop_before_their_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    """Step 2's loss is finite but its gradients are NaN (d sqrt(x) at 0): the update would spoil
    the weights that step 2's checkpoint saves."""
    real = cdmbench.training.trainer.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss + 0 * (loss * 0).sqrt() if len(calls) == 2 else loss

    monkeypatch.setattr(cdmbench.training.trainer, "diffusion_loss", poisoned)
    with pytest.raises(CdmbenchError, match=r"gradient norm is nan \(loss .*\) at step 2; lower train.lr .* "
                                            "or set train.grad_clip"):
        run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    assert not list((tmp_path / "a" / "base8" / "checkpoints").glob("step-*"))
    log = [json.loads(x) for x in (tmp_path / "a" / "base8" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["grad_norm"] > 0


def _slowing_clock(monkeypatch):
    """The trainer's clock: steps 0 and 1 take 1 s each, every later step 3 s."""
    from types import SimpleNamespace

    clock, real = [0.0], cdmbench.training.trainer.Trainer.step

    def timed(self, data, idx, step):
        clock[0] += 1.0 if step < 2 else 3.0
        return real(self, data, idx, step)

    monkeypatch.setattr(cdmbench.training.trainer, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(cdmbench.training.trainer.Trainer, "step", timed)


def test_logged_throughput_is_that_of_the_steps_since_the_previous_row(tiny_recipe, tmp_path, monkeypatch):
    """A clock that each training step moves on by 1 s (steps 1-2), then 3 s (steps 3-4): the
    second row's images/s is a third of the first's (a mean since the start would be half), and
    its seconds are the training time so far."""
    _slowing_clock(monkeypatch)
    run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None,
        overrides=["stages.base8.train.log_every=2"])
    log = [json.loads(x) for x in (tmp_path / "a" / "base8" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and [r["seconds"] for r in log] == [2.0, 8.0]
    assert log[0]["images_per_s"] == pytest.approx(3 * log[1]["images_per_s"])


def test_log_rows_at_checkpoints_and_a_torn_last_row_is_dropped_on_resume(tiny_recipe, tmp_path):
    """A row is written at every checkpoint (so a resume loses no steps' losses), and a row cut
    short by a crash does not block the resume."""
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=2", "stages.base8.train.log_every=4"], **common)
    log_path = tmp_path / "a" / "base8" / "train_log.jsonl"
    with open(log_path, "a") as fh:
        fh.write('{"step": 3, "lo')
    run(tiny_recipe, overrides=["stages.base8.train.log_every=4"], **common)
    assert [json.loads(x)["step"] for x in log_path.read_text().splitlines()] == [2, 4]


def test_a_signal_during_the_last_checkpoint_stops_the_job(tiny_recipe, tmp_path, monkeypatch):
    """SIGTERM while the final checkpoint is written: the stage is complete, and the job stops
    instead of going on to the next stage."""
    import os
    import signal

    real = cdmbench.training.trainer.save_checkpoint

    def save_then_terminate(folder, step, **kwargs):
        path = real(folder, step, **kwargs)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(cdmbench.training.trainer, "save_checkpoint", save_then_terminate)
    with pytest.raises(CdmbenchError, match="stage base8: stopped by SIGTERM after step 4; its checkpoint is in"):
        run(tiny_recipe, out=tmp_path / "a", progress=False, echo=lambda *_: None)
    assert not (tmp_path / "a" / "sr16").exists()


# Operators that read a tensor's value on the host: on a GPU each waits for every queued kernel.
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero", "equal"}
SR16 = ["stages.sr16.train.grad_clip=1.0", "stages.sr16.train.warmup_steps=2",
        "stages.sr16.augmentation=[{name: gaussian, args: {max_level: 0.3}}, {name: blur}]"]


@contextlib.contextmanager
def host_reads():
    """Collects the names of the HOST_READS operators called inside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in HOST_READS:
                found.append(name)
            return func(*args, **(kwargs or {}))

    with Watch():
        yield found


def events_while_training(tiny_recipe, out, monkeypatch, steps: int, watch, overrides=()) -> list[str]:
    """What ``watch()`` (a context manager yielding a list it fills) collects while sr16 of a
    trained base8 trains ``steps`` steps with one log row and one checkpoint."""
    real, seen = cdmbench.training.run.train_stage, []

    def watched(*args, **kwargs):
        with watch() as events:
            result = real(*args, **kwargs)
        seen.extend(events)
        return result

    monkeypatch.setattr(cdmbench.training.run, "train_stage", watched)
    every = [f"stages.sr16.train.{key}={steps}" for key in ("steps", "log_every", "checkpoint_every")]
    run(tiny_recipe, out=out, stage="sr16", progress=False, echo=lambda *_: None,
        overrides=[*every, *SR16, *overrides])
    monkeypatch.setattr(cdmbench.training.run, "train_stage", real)
    return seen


def steps_between_log_rows_make_no_more_events(tiny_recipe, tmp_path, monkeypatch, watch, overrides=()):
    """3 and 6 steps with one log row and one checkpoint each give the same events."""
    run(tiny_recipe, out=tmp_path / "r", stage="base8", progress=False, echo=lambda *_: None,
        overrides=[*SR16, *overrides])
    shutil.copytree(tmp_path / "r", tmp_path / "r2")
    short = events_while_training(tiny_recipe, tmp_path / "r", monkeypatch, 3, watch, overrides)
    long = events_while_training(tiny_recipe, tmp_path / "r2", monkeypatch, 6, watch, overrides)
    assert len(short) == len(long), (short, long)


def test_training_steps_between_log_rows_read_nothing_on_the_host(tiny_recipe, tmp_path, monkeypatch):
    """A step queues its work and goes on (the GPU is never left waiting for the host): the loss
    is read at log rows and checkpoints only, AdamW is fused, the stop flag needs no tensor with
    one process."""
    steps_between_log_rows_make_no_more_events(tiny_recipe, tmp_path, monkeypatch, host_reads)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_recipe, tmp_path):
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=2", "stages.base8.train.checkpoint_every=1"],
        **common)
    latest = tmp_path / "a" / "base8" / "checkpoints" / "step-00000002" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="step-00000002 is unreadable"):
        run(tiny_recipe, overrides=["stages.base8.train.checkpoint_every=1"], **common)
    assert (tmp_path / "a" / "base8" / "checkpoints" / "step-00000004").exists()


def test_dry_run_parameters_match_a_hand_count(tiny_recipe):
    recipe, plugins = load_recipe(tiny_recipe)
    table = describe(recipe, plugins)
    c, E = 32, 128
    # base8: 10 classes, no low-res input, no augmentation; levels 8x8 (32 ch) and 4x4 (64 ch, attn)
    n = linear(c, E) + linear(E, E) + 10 * E + conv(3, 3, c)
    n += resblock(32, 32, E) + resblock(32, 32, E)  # level 0, resblock downsample
    n += resblock(32, 64, E) + attention(64)  # level 1
    n += resblock(64, 64, E) + attention(64) + resblock(64, 64, E)  # middle
    n += resblock(128, 64, E) + attention(64) + resblock(96, 64, E) + attention(64)
    n += resblock(64, 64, E)  # upsample
    n += resblock(96, 32, E) + resblock(64, 32, E) + gn(32) + conv(3, 32, 3)
    assert table.loc["base8", "parameters"] == n
    # sr16: 6 input channels, augmentation MLP, attention at 8x8 on level 1
    assert table.loc["sr16", "parameters"] == n + 3 * 9 * c + linear(c, E) + linear(E, E)
    assert table.loc["sr16", "GFLOP/forward"] > 3 * table.loc["base8", "GFLOP/forward"]
    # Training: backward costs two forwards (input and weight gradients; the input conv needs no
    # input gradient), the run is that x batch x steps, and checkpointing adds at most a forward.
    for stage in ("base8", "sr16"):
        row = table.loc[stage]
        assert 2.9 < row["GFLOP/train image"] / row["GFLOP/forward"] <= 3.0
        assert row["train EFLOP"] == pytest.approx(row["GFLOP/train image"] * 1e9 * 8 * 4 / 1e18)
    recipe, plugins = load_recipe(tiny_recipe, overrides=["stages.base8.train.gradient_checkpointing=true"])
    extra = describe(recipe, plugins).loc["base8", "GFLOP/train image"] - table.loc["base8", "GFLOP/train image"]
    assert 0.5 * table.loc["base8", "GFLOP/forward"] < extra <= table.loc["base8", "GFLOP/forward"]


def test_dry_run_cli_touches_nothing(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(tiny_recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "GFLOP/forward" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_recipe_with_fewer_stages_is_refused_naming_the_removed_one(tiny_recipe, tmp_path):
    common = dict(out=tmp_path / "a", stage="base8", overrides=["stages.base8.train.steps=1"], progress=False,
                  echo=lambda *_: None)
    run(tiny_recipe, **common)
    base_only = tmp_path / "base.yaml"
    base_only.write_text(tiny_recipe.read_text().split("  - name: sr16")[0])
    with pytest.raises(CdmbenchError, match=r"different recipe \(stages: sr16 removed\); pass another --out"):
        run(base_only, **common)


def test_stages_appended_to_a_run_train_and_leave_the_run_and_its_history_as_they_were(tiny_recipe, tmp_path):
    """A replicate is appended: the run is accepted, its stage keeps its weights, the copy (another
    position, other seeds) trains other ones; run.yaml keeps the first invocation's environment
    (other code), and a resume with the same environment adds none. A run.yaml written before a
    key existed (replicate_of) compares as that key's default; one with a key since removed is
    named."""
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=1"], **common)
    run_yaml = tmp_path / "a" / "run.yaml"
    first = yaml.safe_load(run_yaml.read_text())
    for stage in first["recipe"]["stages"]:
        del stage["replicate_of"]
    first["environment"]["git_commit"] = "an older commit"
    run_yaml.write_text(yaml.safe_dump(first))

    def ema(stage):
        [path] = (tmp_path / "a" / stage / "checkpoints").glob("step-*/ema.safetensors")
        return load_file(path)

    before = ema("base8")
    run(tiny_recipe, overrides=["stages.base8.train.steps=1", "stages.base8.replicates=2"],
        **{**common, "stage": "base8_r2"})
    saved = yaml.safe_load(run_yaml.read_text())
    assert [s["name"] for s in saved["recipe"]["stages"]] == ["base8", "sr16", "base8_r2"]
    assert saved["earlier_environments"] == [first["environment"]]
    run(tiny_recipe, overrides=["stages.base8.train.steps=1", "stages.base8.replicates=2"],
        **{**common, "stage": "base8_r2"})
    assert yaml.safe_load(run_yaml.read_text())["earlier_environments"] == [first["environment"]]
    runs = (tmp_path / "a" / "report.md").read_text().split("## Stages trained several times")[1]
    assert re.search(r"\n\| base8\s*\| 2\s*\| train_loss", runs)  # base8's two runs, by their train_loss rows
    after, replicate = ema("base8"), ema("base8_r2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(before[k], replicate[k]) for k in before)
    first["recipe"]["stages"][0]["colour"] = "red"
    run_yaml.write_text(yaml.safe_dump(first))
    with pytest.raises(CdmbenchError, match=r"run.yaml holds a recipe this cdmbench cannot read "
                                            r"\(stages.base8.colour: unknown key"):
        run(tiny_recipe, **common)


def test_the_sampling_level_may_change_on_resume(tiny_recipe, tmp_path):
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=1"], **common)
    run(tiny_recipe, overrides=["stages.base8.train.steps=1", "stages.sr16.augmentation.args.level=0.2"], **common)


def test_every_stage_batch_is_checked_against_the_processes_before_any_trains(tiny_recipe, tmp_path, monkeypatch):
    import cdmbench.runtime.distributed
    from cdmbench.errors import RecipeError

    monkeypatch.setattr(cdmbench.runtime.distributed, "world_size", lambda: 2)  # as under torchrun
    monkeypatch.setattr(cdmbench.runtime.distributed, "init", lambda device: None)
    monkeypatch.setattr(cdmbench.training.run, "train_stage", lambda *a, **k: pytest.fail("a stage trained"))
    with pytest.raises(RecipeError, match=r"^stages.sr16.train.batch_size: 7 is the global batch; it must "
                                          r"divide evenly into 2 processes") as error:
        run(tiny_recipe, out=tmp_path / "a", overrides=["stages.sr16.train.batch_size=7"], progress=False,
            echo=lambda *_: None)
    assert error.value.path == "stages.sr16.train.batch_size"


def test_a_slow_checkpoint_says_how_long_a_stop_signal_must_leave(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(cdmbench.training.trainer, "SLOW_CHECKPOINT_S", 0.0)  # every checkpoint counts as slow here
    said = []
    run(tiny_recipe, out=tmp_path / "r", stage="base8", progress=False, echo=said.append)
    slow = [s for s in said if "to write: a preempted job must get that long between SIGTERM and SIGKILL" in s]
    assert len(slow) == 1 and "checkpoint_every=2 steps are trained again" in slow[0]  # said once of 2 checkpoints


def test_a_job_of_one_stage_builds_no_other_stage_on_the_device_while_it_trains(tiny_recipe, tmp_path, monkeypatch):
    """--stage sr256 held base32 and sr64 (6.3 GB of weights) on every GPU; now only the main
    process builds them, after training, to sample the cascade."""
    run(tiny_recipe, out=tmp_path / "r", stage="base8", progress=False, echo=lambda *_: None)
    events, build, train = [], cdmbench.training.run.build_stage, cdmbench.training.run.train_stage
    def watched(plugins, recipe, spec, **kw):
        events.append((spec.name, str(kw["device"])))
        return build(plugins, recipe, spec, **kw)

    for module in (cdmbench.training.run, cdmbench.cascade.stages):  # run's own builds, and build_all's
        monkeypatch.setattr(module, "build_stage", watched)
    monkeypatch.setattr(cdmbench.training.run, "train_stage", lambda st, *a, **kw: events.append(
        ("train", st.spec.name)) or train(st, *a, **kw))
    run(tiny_recipe, out=tmp_path / "r", stage="sr16", progress=False, echo=lambda *_: None)
    assert events == [("base8", "meta"), ("sr16", "meta"), ("sr16", "cpu"), ("train", "sr16"), ("base8", "cpu")]
    assert (tmp_path / "r" / "sr16" / "samples" / "grid.png").exists()  # the cascade was sampled


def test_the_throughput_row_is_that_of_the_whole_training_across_resumes(tiny_recipe, tmp_path, monkeypatch):
    """A clock that steps 1-2 move on by 1 s each, then, in a resumed run, steps 3-4 by 3 s each:
    the row is 4 steps x 8 images / 8 s = 4 img/s (the last log window, steps 3-4, says 16 / 6 s),
    and the first run's 16 / 2 s."""
    _slowing_clock(monkeypatch)
    common = dict(out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=["stages.base8.train.steps=2", "stages.base8.train.log_every=2"], **common)
    run(tiny_recipe, overrides=["stages.base8.train.log_every=2"], **common)
    log = [json.loads(x) for x in (tmp_path / "a" / "base8" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["seconds"]) for r in log] == [(2, 2.0), (4, 8.0)]
    assert log[-1]["images_per_s"] == pytest.approx(16 / 6)  # the log keeps the window
    rows = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    throughput = [r for r in rows if r["metric"] == "train_throughput"]
    assert [(r["n"], r["value"]) for r in throughput] == [(2, 8.0), (4, 4.0)]
    assert throughput[-1]["protocol"] == {"device": "cpu", "images": 32, "seconds": 8.0,
                                          "over": "all training steps, across resumes: images / training seconds"}


@pytest.mark.slow
def test_running_a_finished_run_again_records_nothing_twice(tiny_recipe, tmp_path, monkeypatch):
    """The same command again adds no row (nor computes the bound or samples the grids again); a
    run resumed to more steps adds the rows of its new weights: base8's training rows and bound,
    and the grids of base8 and of sr16, which it conditions; another sampling level, new grids."""
    calls = []
    for name in ("validation_bpd", "sample_cascade"):
        real = getattr(cdmbench.training.run, name)
        monkeypatch.setattr(cdmbench.training.run, name,
                            lambda *a, _name=name, _real=real, **k: calls.append(_name) or _real(*a, **k))
    hybrid = ["stages.base8.loss=hybrid", "stages.base8.train.val_bpd_images=2",
              "stages.base8.sampler={name: ddpm, args: {variance: learned, steps: 4}}"]
    out = tmp_path / "a"
    common = dict(out=out, progress=False, echo=lambda *_: None)
    run(tiny_recipe, overrides=hybrid, **common)
    results, grid = (out / "results.jsonl").read_text(), (out / "sr16" / "samples" / "grid.png").stat().st_mtime_ns
    assert calls == ["validation_bpd", "sample_cascade"]
    said = []
    run(tiny_recipe, overrides=hybrid, out=out, progress=False, echo=said.append)
    assert (out / "results.jsonl").read_text() == results
    assert calls == ["validation_bpd", "sample_cascade"]
    assert (out / "sr16" / "samples" / "grid.png").stat().st_mtime_ns == grid
    assert f"sr16: {out / 'sr16' / 'samples' / 'grid.png'} (sampled before with these checkpoints and settings)" in said
    run(tiny_recipe, overrides=[*hybrid, "stages.base8.train.steps=6"], **common)
    new = [json.loads(x) for x in (out / "results.jsonl").read_text()[len(results):].splitlines()]
    assert sorted((r["stage"], r["metric"], r["n"]) for r in new) == [
        ("base8", "sample_time", 10), ("base8", "train_loss", 6), ("base8", "train_throughput", 6),
        ("base8", "val_bpd", 2), ("sr16", "sample_time", 10)]
    assert calls == ["validation_bpd", "sample_cascade"] * 2
    run(tiny_recipe, overrides=[*hybrid, "stages.base8.train.steps=6", "stages.sr16.augmentation.args.level=0.2"],
        **common)  # another sampling level: other grids
    assert calls == ["validation_bpd", "sample_cascade"] * 2 + ["sample_cascade"]


def test_the_files_of_a_run_are_readable_by_others_under_umask_022(tiny_recipe, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None,
                  overrides=["stages.base8.train.steps=2"])
    finally:
        os.umask(old)
    checkpoint = out / "base8" / "checkpoints" / "step-00000002"
    files = [out / "report.md", out / "run.yaml", out / "results.jsonl", out / "base8" / "samples" / "grid.png",
             out / "base8" / "train_log.jsonl", *checkpoint.iterdir()]
    assert len(files) == 9 and {str(f.relative_to(out)): oct(f.stat().st_mode & 0o777) for f in files} == {
        str(f.relative_to(out)): "0o644" for f in files}
    assert oct(checkpoint.stat().st_mode & 0o777) == "0o755"


def test_a_checkpoint_a_read_only_disk_refuses_stops_the_run_saying_so(tiny_recipe, tmp_path, monkeypatch):
    import safetensors

    import cdmbench.training.checkpoint

    real = cdmbench.training.checkpoint.save_file

    def read_only_at_step_4(tensors, path, metadata=None):
        if (metadata or {}).get("step") == "4":
            raise safetensors.SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(cdmbench.training.checkpoint, "save_file", read_only_at_step_4)
    out = tmp_path / "a"
    result = CliRunner().invoke(cli, ["run", str(tiny_recipe), "--out", str(out), "--stage", "base8", "--no-progress"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    checkpoints = out / "base8" / "checkpoints"
    assert (f"error: cannot write checkpoint {checkpoints / 'step-00000004'}: Read-only file system writing "
            f"{checkpoints} (the file system there is read-only). Write to a writable disk") in result.output
    assert "(earlier checkpoints are untouched)" in result.output and "free space" not in result.output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    monkeypatch.undo()  # the disk is writable again: the same command resumes from step 2
    run(tiny_recipe, out=out, stage="base8", progress=False, echo=lambda *_: None)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]  # none corrupt
