"""Quality during training (``train.eval_every``): the weights are those of a run without it, a
row per metric at each due step with the step and images seen, SR stages on ground-truth inputs,
resumes that neither repeat nor skip a step, several processes, and the recipe's checks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdmbench.training.trainer
from cdmbench.builtin.features import INCEPTION_URL
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.recipe.load import load_recipe
from cdmbench.reporting.curves import quality_rows
from cdmbench.reporting.tables import read_results, results_table, sweep_rows
from cdmbench.storage.rundir import RunDir
from cdmbench.training.run import run
from tests.conftest import TINY_RECIPE

CLASSIFIER = "features: classifier, features_args: {epochs: 1}"
FID = f"evaluate.metrics=[{{name: fid, args: {{{CLASSIFIER}, reference: [train], bootstrap: 2}}}}]"
IS = f"evaluate.metrics=[{{name: is, args: {{{CLASSIFIER}, splits: 2}}}}]"  # no matrix square roots: quick
N = 20  # samples per evaluation: 2 per class


def evaluating(stage: str, every: int) -> list[str]:
    return [f"stages.{stage}.train.eval_every={every}", f"stages.{stage}.train.eval_num_samples={N}"]


def rows_during_training(out: Path, stage: str) -> list[dict]:
    return [r for r in RunDir(out).results() if r["stage"] == stage and r["protocol"].get("during_training")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: each stage's feature classifier is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _private_cache(cache, monkeypatch):
    monkeypatch.setenv("CDMBENCH_CACHE", str(cache))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, cache) -> tuple[Path, list[str]]:
    """Both stages trained with evaluations: base8 every 2 steps, sr16 every 3 (and at the last,
    step 4); the run directory and the lines it printed."""
    folder = tmp_path_factory.mktemp("evaluated")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    said: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDMBENCH_CACHE", str(cache))
        out = run(folder / "tiny.yaml", out=folder / "run", progress=False, echo=said.append,
                  overrides=[FID, *evaluating("base8", 2), *evaluating("sr16", 3)])
    return out, said


@pytest.mark.slow
def test_evaluations_leave_the_weights_as_without_them_and_record_each_due_step(evaluated, tiny_recipe, tmp_path):
    out, said = evaluated
    plain = run(tiny_recipe, out=tmp_path / "plain", progress=False, echo=lambda *_: None)
    for stage in ("base8", "sr16"):
        a, b = (folder / stage / "checkpoints" / "step-00000004" for folder in (plain, out))
        for name in ("model", "ema"):  # (weights_sha256 differs: it hashes the recipe in the metadata too)
            x, y = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (stage, name)

    base, sr = rows_during_training(out, "base8"), rows_during_training(out, "sr16")
    assert [(r["metric"], r["protocol"]["step"], r["protocol"]["train_images"]) for r in base] == [
        ("fid_train", step, 8 * step) for step in (2, 4)]  # batch 8
    assert [r["protocol"]["step"] for r in sr] == [3, 4]  # every 3 steps, and the last
    for r in base + sr:
        assert r["status"] == "ok" and r["n"] == N and r["stderr"] > 0 and r["protocol"]["features"] == "classifier"
    assert "inputs" not in base[0]["protocol"]  # the base samples from its own EMA
    assert {(r["protocol"]["inputs"], r["protocol"]["inputs_split"], tuple(r["protocol"]["levels"])) for r in sr} == {
        ("ground-truth", "train", (0.1,))}
    lines = [line for line in said if line.startswith("eval ")]
    assert len(lines) == 4
    assert re.fullmatch(r"eval sr16 step 4: fid_train \d+\.?\d* ± [\d.e-]+ \(\d+\.\d s\)", lines[-1])

    # The report's tables leave them out; the curves take them, one point per stage and step.
    frame = read_results([out])
    table = results_table(frame)
    assert not any("fid" in column for column in table.columns) and sweep_rows(frame).empty
    curve = quality_rows(frame)
    assert list(zip(curve["stage"], curve["step"], strict=True)) == [("base8", 2), ("base8", 4), ("sr16", 3),
                                                                      ("sr16", 4)]
    # report.md shows them in their own section, with the plot of each metric against training images
    report = (out / "report.md").read_text()
    section = report.split("## Quality during training")[1].split("\n## ")[0]
    shown = [line.split("|")[1:5] for line in section.splitlines() if line.startswith("| ") and "fid" in line]
    assert [(s.strip(), int(step), int(images)) for s, _, step, images in shown] == [
        ("base8", 2, 16), ("base8", 4, 32), ("sr16", 3, 24), ("sr16", 4, 32)]
    assert "![metrics against training images seen](quality.png)" in section and (out / "quality.png").is_file()


@pytest.mark.slow
def test_a_resumed_run_evaluates_every_due_step_once(tiny_recipe, tmp_path, monkeypatch):
    """Stopped during step 2 (its checkpoint written, its evaluation not made), then killed while
    writing step 4's checkpoint (step 3 evaluated, and trained again on resume): the rows are
    those of the uninterrupted run, once each."""
    common = dict(out=tmp_path / "r", stage="base8", progress=False, echo=lambda *_: None,
                  overrides=[IS, *evaluating("base8", 1)])
    real_step, real_save = cdmbench.training.trainer.Trainer.step, cdmbench.training.trainer.save_checkpoint

    def stopped_in_step_2(self, data, idx, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, data, idx, step)

    monkeypatch.setattr(cdmbench.training.trainer.Trainer, "step", stopped_in_step_2)
    with pytest.raises(CdmbenchError, match="stopped by SIGTERM after step 2"):
        run(tiny_recipe, **common)
    assert [r["protocol"]["step"] for r in rows_during_training(tmp_path / "r", "base8")] == [1]

    class Killed(Exception):
        pass

    def killed_at_step_4(folder, step, **kwargs):
        if step == 4:
            raise Killed
        return real_save(folder, step, **kwargs)

    monkeypatch.setattr(cdmbench.training.trainer.Trainer, "step", real_step)
    monkeypatch.setattr(cdmbench.training.trainer, "save_checkpoint", killed_at_step_4)
    with pytest.raises(Killed):
        run(tiny_recipe, **common)  # resumes at step 2: evaluates it, then 3
    assert [r["protocol"]["step"] for r in rows_during_training(tmp_path / "r", "base8")] == [1, 2, 3]

    monkeypatch.setattr(cdmbench.training.trainer, "save_checkpoint", real_save)
    run(tiny_recipe, **common)  # resumes at step 2 again: trains 3 again, evaluates 4 only
    run(tiny_recipe, **common)  # a finished run: nothing more
    resumed = rows_during_training(tmp_path / "r", "base8")
    uninterrupted = rows_during_training(run(tiny_recipe, **{**common, "out": tmp_path / "u"}), "base8")
    assert [r["protocol"]["step"] for r in resumed] == [1, 2, 3, 4]
    assert [(r["protocol"]["step"], r["value"]) for r in resumed] == [
        (r["protocol"]["step"], r["value"]) for r in uninterrupted]


@pytest.mark.slow
def test_two_processes_share_the_samples_and_rank_0_records_each_step_once(tiny_recipe, tmp_path, cache):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cdmbench", "run",
           str(tiny_recipe), "--out", str(tmp_path / "two"), "--stage", "base8", "--no-progress",
           *[f"--set={o}" for o in [IS, *evaluating("base8", 2)]]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stdout + done.stderr
    rows = rows_during_training(tmp_path / "two", "base8")
    assert [(r["protocol"]["step"], r["n"]) for r in rows] == [(2, N), (4, N)]  # both processes' samples
    assert len(re.findall(r"eval base8 step \d", done.stdout)) == 2


def test_a_missing_feature_network_fails_before_any_training(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("CDMBENCH_INCEPTION", str(tmp_path / "absent.pt"))
    with pytest.raises(CdmbenchError, match=re.escape(INCEPTION_URL)):
        run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None,
            overrides=["evaluate.metrics=[fid]", *evaluating("sr16", 2)])
    assert not list((tmp_path / "r").glob("*/checkpoints"))


def test_a_metric_that_needs_a_generated_training_set_is_left_out_saying_so(tiny_recipe, tmp_path):
    said = []
    with pytest.raises(CdmbenchError, match="no metric of evaluate.metrics can be computed during training"):
        run(tiny_recipe, out=tmp_path / "r", progress=False, echo=said.append,
            overrides=["evaluate.metrics=[{name: cas, args: {replace_training_set: true}}]",
                       "stages.base8.train.eval_every=2"])
    assert any("cas not computed during training" in line for line in said)
    assert not list((tmp_path / "r").glob("*/checkpoints"))


def test_the_recipe_keys_are_checked_shrunk_by_smoke_and_may_change_on_resume(tiny_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.base8\.train\.eval_every: must be at most steps \(4\)"):
        load_recipe(tiny_recipe, overrides=["evaluate.metrics=[fid]", "stages.base8.train.eval_every=5"])
    with pytest.raises(RecipeError, match=r"stages\.base8\.train\.eval_every: evaluates with evaluate\.metrics"):
        load_recipe(tiny_recipe, overrides=["stages.base8.train.eval_every=2"])
    with pytest.raises(RecipeError, match=r"eval_num_samples: must be in \[1, 10\^8\]"):
        load_recipe(tiny_recipe, overrides=["stages.base8.train.eval_num_samples=0"])
    evaluating_base = "train: {steps: 4, eval_every: 4, eval_num_samples: 99,"
    text = tiny_recipe.read_text().replace("train: {steps: 4,", evaluating_base, 1)
    tiny_recipe.write_text(text + "evaluate: {metrics: [fid]}\n")
    recipe, plugins = load_recipe(tiny_recipe, smoke=True, echo=lambda *_: None)
    assert (recipe.stage("base8").train.eval_every, recipe.stage("base8").train.eval_num_samples) == (2, 16)
    assert recipe.stage("sr16").train.eval_every == 0  # off stays off

    plain, _ = load_recipe(tiny_recipe, overrides=["stages.base8.train.eval_every=0"])
    run_dir = RunDir(tmp_path / "r")
    run_dir.prepare(plain, plugins, [str(k) for k in range(10)])
    evaluated, _ = load_recipe(tiny_recipe, overrides=["stages.sr16.train.eval_every=1",
                                                       "stages.sr16.train.eval_num_samples=30"])
    run_dir.check(evaluated)  # a trained run may start (or stop) evaluating while it trains on
