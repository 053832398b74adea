"""`cdmbench launch` and `cdmbench status`: the sbatch scripts a dry run prints, the settings'
precedence, and on this machine through submitit's local executor (gloo on the CPU): stages as
separate jobs then the cascade's sampling after them, an evaluation array then its metrics, a
stage preempted mid-run that requeues itself to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cdmbench.cli import cli
from cdmbench.launch.options import resolve, time_minutes
from cdmbench.launch.plan import launch
from cdmbench.launch.status import status
from cdmbench.recipe.schema import Launch
from cdmbench.training.run import run

TINY_EVAL = ["evaluate.num_samples=30", "evaluate.shard_size=12", "evaluate.batch_size=16",
             "evaluate.metrics=[{name: cas, args: {epochs: 1}}]"]


def quiet(*_):
    pass


@pytest.fixture(autouse=True)
def no_user_config(tmp_path, monkeypatch):
    """Launch settings from the test's own config file (none unless a test writes it)."""
    monkeypatch.setenv("CDMBENCH_LAUNCH_CONFIG", str(tmp_path / "launch.yaml"))


def final_weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    latest = sorted((out / stage / "checkpoints").glob("step-*"))[-1]
    return load_file(latest / "model.safetensors")


def test_dry_run_prints_the_sbatch_scripts_with_the_nodes_gpus_and_time_asked_for(tiny_recipe, tmp_path):
    args = ["launch", str(tiny_recipe), "--dry-run", "--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "4",
            "--time", "1-12:00:00", "--partition", "gpu", "--account", "lab", "--grace", "120", "--signal", "USR1",
            "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    scripts = result.output.split("# --- ")[1:]
    assert [s.splitlines()[0] for s in scripts] == ["train base8", "train sr16", "sample"]
    for script in scripts[:2]:  # training: 2 nodes x 4 GPUs, one process per GPU
        for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=2160", "--partition=gpu",
                     "--account=lab", "--signal=USR1@120", "--requeue"):
            assert f"#SBATCH {line}\n" in script, (line, script)
        assert "export SUBMITIT_PREEMPT_SIGNAL=USR1\n" in script and "srun" in script
    assert "#SBATCH --dependency='afterok:<train-base8>:<train-sr16>'" in scripts[2]
    assert "#SBATCH --nodes=1\n" in scripts[2] and "#SBATCH --gpus-per-node=1\n" in scripts[2]
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


FAKE_SBATCH = """#!/bin/sh
n=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 100) + 1 ))
echo $n > "$FAKE_SLURM/count"
cp "$1" "$FAKE_SLURM/job-$n.sh"
echo "Submitted batch job $n"
"""


def test_on_slurm_each_job_is_submitted_with_the_ids_of_those_it_waits_for(tiny_recipe, tmp_path, monkeypatch):
    """Through submitit's SLURM executor and a stand-in sbatch that numbers the jobs from 101."""
    bin_dir, slurm = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir(), slurm.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(slurm))
    (tmp_path / "launch.yaml").write_text("eval_array: 2\ncluster: slurm\n")
    ids = launch(tiny_recipe, evaluate=True, overrides=TINY_EVAL, out=tmp_path / "run", echo=quiet)
    assert ids == {"train base8": ["101"], "train sr16": ["102"], "sample": ["103"], "shards": ["104_0", "104_1"],
                   "metrics": ["105"]}
    scripts = {n: (slurm / f"job-{n}.sh").read_text() for n in range(101, 106)}
    assert "--dependency" not in scripts[101] + scripts[102]  # the stages train concurrently
    assert "#SBATCH --dependency=afterok:101:102\n" in scripts[103] and "afterok:101:102\n" in scripts[104]
    assert "#SBATCH --array=0-1%2\n" in scripts[104] and "#SBATCH --dependency=afterok:104\n" in scripts[105]
    recorded = json.loads((tmp_path / "run" / "launch.json").read_text())["launches"][0]
    assert recorded["cluster"] == "slurm" and {j["name"]: j["job_ids"] for j in recorded["jobs"]} == ids


def test_settings_come_from_the_command_line_then_the_recipe_then_the_user_config(tmp_path):
    (tmp_path / "launch.yaml").write_text("partition: big\ntime: '90'\nnodes: 4\ngpus_per_node: 2\n")
    got = resolve(Launch(time="2:00:00", nodes=3), {"nodes": 8, "partition": None})
    assert (got.nodes, got.time, got.partition, got.gpus_per_node, got.signal, got.grace_s) == \
        (8, "2:00:00", "big", 2, "USR2", 300)
    assert [time_minutes(t) for t in ("90", "1:30:00", "0:00:30", "2-00:00:00")] == [90, 90, 1, 2880]


@pytest.mark.parametrize("args, message", [
    (["--time", "tomorrow"], "launch.time: 'tomorrow' is no time limit; write MINUTES, HH:MM:SS or D-HH:MM:SS"),
    (["--signal", "KILL"], "launch.signal: 'KILL' cannot ask a job to checkpoint and requeue"),
    (["--gpus-per-node", "3"], "stages.base8.train.batch_size: 8 does not divide into 1 node(s) x 3 process(es)"),
    (["--stage", "sr61"], "no stage 'sr61'"),
    (["--time", "5", "--grace", "400"], "launch.grace_s: 400 s is not shorter than the time limit 5"),
])
def test_bad_settings_fail_in_one_line_before_anything_is_submitted(tiny_recipe, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["launch", str(tiny_recipe), "--dry-run", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_slurm_without_sbatch_fails_in_one_line_before_anything_is_written(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(cli, ["launch", str(tiny_recipe), "--cluster", "slurm", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "error: sbatch and srun are not on PATH: launch on a SLURM login node" in \
        result.output, result.output
    assert not (tmp_path / "r").exists()


def test_a_bad_user_config_names_the_file_and_key(tiny_recipe, tmp_path):
    (tmp_path / "launch.yaml").write_text("nodes: 0\n")
    result = CliRunner().invoke(cli, ["launch", str(tiny_recipe), "--dry-run"])
    assert result.exit_code == 2 and f"{tmp_path / 'launch.yaml'}: nodes: must be in [1, 10000], got 0" in result.output


def test_status_reports_steps_checkpoints_shards_and_job_ids(tmp_path):
    """On a run directory written here: 3 of 10 steps at 2 images/s with batch 4 (28 images left:
    14 s), a complete stage, 2 of 3 evaluation shards (25 of 30 samples: 12 + 13) and the jobs."""
    import yaml

    stages = [{"name": "base", "train": {"steps": 10, "batch_size": 4}},
              {"name": "sr", "train": {"steps": 5, "batch_size": 2}}]
    recipe = {"stages": stages, "evaluate": {"num_samples": 50, "shard_size": 10}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"recipe": recipe}))
    for name, rows, kept in (("base", [(2, 1.0), (3, 2.0)], [2]), ("sr", [(5, 9.0)], [4, 5])):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        for step in kept:
            (tmp_path / name / "checkpoints" / f"step-{step:08d}").mkdir()
        (tmp_path / name / "checkpoints" / "step-00000009.tmp-123").mkdir()  # a folder being written
        log = "".join(json.dumps({"step": s, "images_per_s": r}) + "\n" for s, r in rows)
        (tmp_path / name / "train_log.jsonl").write_text(log + '{"step": 4, "ima')  # a torn last line
    samples = tmp_path / "sr" / "eval_samples" / "abc123"
    samples.mkdir(parents=True)
    for span in ("00000-0-12", "00002-24-30", "00001-12-13"):
        (samples / f"shard-{span}.npz").touch()
    launch_doc = {"launches": [{"id": "x", "time": "t0", "cluster": "slurm", "jobs": [
        {"name": "train base", "job_ids": ["101"], "after": []},
        {"name": "shards", "job_ids": ["102_0", "102_1", "102_2"], "after": [], "stage": "sr", "num_samples": 30,
         "shard_size": 12, "elements": 3}]}]}
    (tmp_path / "launch.json").write_text(json.dumps(launch_doc))
    state = status(tmp_path)
    assert [(s["stage"], s["step"], s["steps"], s["checkpoint"], s["images_per_s"]) for s in state["stages"]] == \
        [("base", 3, 10, 2, 2.0), ("sr", 5, 5, 5, 9.0)]
    assert state["stages"][0]["seconds_left"] == pytest.approx(14.0) and state["stages"][1]["seconds_left"] == 0
    assert [(e["folder"], e["shards"], e["total"], e["samples"]) for e in state["evaluations"]] == \
        [("sr/eval_samples/abc123", 2, 3, 13)]  # shard 1 (12-24) is missing: rows 0..13 held
    result = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "shards: 102_0, 102_1, 102_2" in result.output and "sr/eval_samples/abc123: 2/3 shards" in result.output
    missing = CliRunner().invoke(cli, ["status", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "is not a run directory" in missing.output


@pytest.mark.slow
def test_a_local_launch_trains_each_stage_as_a_job_then_samples_after_both(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    ids = launch(tiny_recipe, out=out, options={"cluster": "local"}, echo=quiet)
    assert list(ids) == ["train base8", "train sr16", "sample"] and len({i for job in ids.values() for i in job}) == 3

    def written(job_id: str, suffix: str) -> int:
        return (out / "launch" / f"{job_id}_{suffix}").stat().st_mtime_ns

    trained = max(written(i, "0_result.pkl") for i in ids["train base8"] + ids["train sr16"])
    assert written(ids["sample"][0], "submitted.pkl") >= trained  # submitted once both stages had trained
    assert (out / "sr16" / "samples" / "grid.png").exists()
    state = status(out)
    assert [(s["step"], s["steps"], s["checkpoint"]) for s in state["stages"]] == [(4, 4, 4), (4, 4, 4)]
    assert [job["job_ids"] for job in state["launches"][-1]["jobs"]] == list(ids.values())


@pytest.mark.slow
def test_a_job_of_two_processes_joins_one_process_group_from_the_executor_s_variables(tiny_recipe, tmp_path):
    """Two processes on the CPU (gloo), ranks and rendezvous from submitit's job environment,
    reach the weights of one process (up to float summation order)."""
    from tests.training.test_distributed import assert_same_weights

    out = tmp_path / "run"
    ids = launch(tiny_recipe, stages=["base8"], out=out, options={"cluster": "local", "gpus_per_node": 2}, echo=quiet)
    job_log = (out / "launch" / f"{ids['train base8'][0]}_0_log.out").read_text()
    assert "(device: cpu, processes: 2)" in job_log, job_log
    assert len((out / "base8" / "train_log.jsonl").read_text().splitlines()) == 4  # rank 0 alone writes
    one = run(tiny_recipe, out=tmp_path / "one", stage="base8", progress=False, echo=quiet)
    assert_same_weights(final_weights(out, "base8"), final_weights(one, "base8"))


@pytest.mark.slow
def test_an_evaluation_array_of_three_writes_each_shard_once_and_a_relaunch_skips_them(tiny_recipe, tmp_path):
    """Three elements, one 12-sample shard each (of 30), then the metrics job, which samples
    nothing; launched again, no shard is written."""
    (tmp_path / "launch.yaml").write_text("eval_array: 3\ncluster: local\n")  # the user config file
    out = run(tiny_recipe, out=tmp_path / "run", overrides=TINY_EVAL, progress=False, echo=quiet)
    ids = launch(out, evaluate=True, echo=quiet)
    assert list(ids) == ["shards", "metrics"] and len(ids["shards"]) == 3
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "sr16" / "eval_samples").glob("*/shard-*.npz")}
    assert sorted(shards) == ["shard-00000-0-12.npz", "shard-00001-12-24.npz", "shard-00002-24-30.npz"]
    metrics_job = (out / "launch" / f"{ids['metrics'][0]}_submitted.pkl").stat().st_mtime_ns
    assert max(shards.values()) <= metrics_job  # all written by the array, before the metrics job began
    cas = [row for row in map(json.loads, (out / "results.jsonl").open()) if row["metric"].startswith("cas")]
    assert cas and {row["n"] for row in cas} == {30}
    assert [(e["shards"], e["total"], e["samples"]) for e in status(out)["evaluations"]] == [(3, 3, 30)]

    again = launch(out, evaluate=True, echo=quiet)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sr16" / "eval_samples").glob("*/shard-*.npz")} == shards
    assert [launch["jobs"][0]["job_ids"] for launch in status(out)["launches"]] == [ids["shards"], again["shards"]]


def _task_of(controller: int, deadline: float) -> int:
    """The pid of the process the local executor's controller runs the job in."""
    children = Path(f"/proc/{controller}/task/{controller}/children")
    while time.time() < deadline:
        pids = children.read_text().split() if children.exists() else []
        if pids:
            return int(pids[0])
        time.sleep(0.05)
    raise AssertionError("the job's process never started")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's process in /proc (Linux)")
def test_a_preempted_stage_checkpoints_requeues_and_reaches_the_weights_of_an_uninterrupted_run(tiny_recipe,
                                                                                               tmp_path):
    steps = ["--set", "stages.base8.train.steps=20", "--set", "stages.base8.train.checkpoint_every=1000"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cdmbench", "launch", str(tiny_recipe), "--cluster", "local", "--stage", "base8",
           "--out", str(out), *steps]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
                            start_new_session=True)  # the launcher, the executor's controller and the job
    try:
        deadline = time.time() + 300
        while not (out / "launch.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        job_id = json.loads((out / "launch.json").read_text())["launches"][0]["jobs"][0]["job_ids"][0]
        task = _task_of(int(job_id), deadline)
        log = out / "base8" / "train_log.jsonl"
        while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.time() < deadline:
            time.sleep(0.02)
        os.kill(task, signal.SIGUSR2)  # as SLURM does grace_s before the time limit
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "base8" / "checkpoints").glob("step-*"))
    job_log = "".join((out / "launch" / f"{job_id}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert f"stopped by SIGUSR2 after step {kept[0]}; its checkpoint" in job_log, job_log
    assert "the job requeues itself" in job_log and "Requeued job" in job_log, job_log
    assert len(kept) == 2 and 2 <= kept[0] < 20 and kept[1] == 20  # saved on the signal, then finished
    straight = run(tiny_recipe, out=tmp_path / "straight", stage="base8", overrides=[s for s in steps if s != "--set"],
                   progress=False, echo=quiet)
    a, b = final_weights(out, "base8"), final_weights(straight, "base8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
