"""Training on several processes (torchrun, gloo on CPU) and the training-step options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdmbench.training.run import run


def final_weights(out, stage):
    latest = sorted((out / stage / "checkpoints").glob("step-*"))[-1]
    return load_file(latest / "model.safetensors")


def assert_same_weights(a, b):
    """Equal up to float summation order. Adam divides each gradient by its running RMS, so a
    weight whose gradient is ~0 can move by up to lr on rounding noise: the bulk of the weights
    must agree to 1e-5 and none may differ by more than one step (lr = 1e-3)."""
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.median() < 1e-6 and (diffs > 1e-5).float().mean() < 1e-3, diffs.max()
    assert diffs.max() < 1e-3


def quiet(*_):
    pass


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one(tiny_recipe, tmp_path):
    one = run(tiny_recipe, out=tmp_path / "one", progress=False, echo=quiet)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cdmbench",
           "run", str(tiny_recipe), "--out", str(tmp_path / "two"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stdout + done.stderr
    two = tmp_path / "two"
    for stage in ("base8", "sr16"):  # sr16 also draws augmentation noise per example
        assert_same_weights(final_weights(one, stage), final_weights(two, stage))
    assert (two / "sr16" / "samples" / "grid.png").exists()  # rank 0 sampled
    assert len((two / "base8" / "train_log.jsonl").read_text().splitlines()) == 4  # one writer


def test_gradient_accumulation_matches_the_full_batch(tiny_recipe, tmp_path):
    common = dict(stage="base8", progress=False, echo=quiet)
    full = run(tiny_recipe, out=tmp_path / "full", **common)
    micro = run(tiny_recipe, out=tmp_path / "micro", overrides=["stages.base8.train.grad_accumulation=4"], **common)
    assert_same_weights(final_weights(full, "base8"), final_weights(micro, "base8"))


@pytest.mark.slow
def test_warmup_clipping_and_bf16_change_training(tiny_recipe, tmp_path):
    common = dict(stage="base8", progress=False, echo=quiet)
    plain = final_weights(run(tiny_recipe, out=tmp_path / "plain", **common), "base8")
    for name, override in (("warm", "stages.base8.train.warmup_steps=10"),
                           ("clip", "stages.base8.train.grad_clip=1.0e-3"),
                           ("bf16", "stages.base8.train.precision=bf16")):
        other = final_weights(run(tiny_recipe, out=tmp_path / name, overrides=[override], **common), "base8")
        moved = max((plain[k] - other[k]).abs().max().item() for k in plain)
        assert moved > 1e-4, name  # each changes the updates, not just their rounding
    # channels_last changes the memory layout (and the rounding), not the math
    layout = run(tiny_recipe, out=tmp_path / "cl", overrides=["stages.base8.train.channels_last=true"], **common)
    assert_same_weights(plain, final_weights(layout, "base8"))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_run_resumes_exactly(tiny_recipe, tmp_path):
    import signal
    import time

    long = ["--set", "stages.base8.train.steps=2000", "--set", "stages.base8.train.checkpoint_every=5000",
            "--set", "stages.base8.train.log_every=1"]
    cmd = [sys.executable, "-m", "cdmbench", "run", str(tiny_recipe), "--out", str(tmp_path / "a"),
           "--stage", "base8", "--no-progress", *long]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "a" / "base8" / "train_log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    assert "stopped by SIGTERM after step" in output and "run the same command again" in output
    step = int(sorted((tmp_path / "a" / "base8" / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    assert 3 <= step < 2000  # written when stopped, not at a checkpoint_every multiple

    # Resuming to step + 2 gives the weights of an uninterrupted run of step + 2 steps.
    common = dict(stage="base8", progress=False, echo=quiet)
    resumed = run(tiny_recipe, out=tmp_path / "a", overrides=[f"stages.base8.train.steps={step + 2}"], **common)
    straight = run(tiny_recipe, out=tmp_path / "b", overrides=[f"stages.base8.train.steps={step + 2}"], **common)
    a, b = final_weights(resumed, "base8"), final_weights(straight, "base8")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_and_restart_reach_the_weights_of_an_uninterrupted_run(tiny_recipe, tmp_path):
    import signal
    import time

    steps = 12

    def command(out):
        return [sys.executable, "-m", "cdmbench", "run", str(tiny_recipe), "--stage", "base8", "--out",
                str(out), "--no-progress", "--set", f"stages.base8.train.steps={steps}",
                "--set", "stages.base8.train.checkpoint_every=1"]

    killed = tmp_path / "killed" / "base8" / "checkpoints"
    straight = subprocess.Popen(command(tmp_path / "straight"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # a run never stopped, meanwhile
    proc = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (killed / "step-00000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # wherever it is: mid-step or mid-checkpoint
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / f"step-{steps:08d}").exists()  # it died before the end
    resumed = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr  # the same command again resumes
    assert straight.wait(timeout=120) == 0, straight.communicate()[0]
    for name in ("model", "ema"):
        a, b = (load_file(tmp_path / out / "base8" / "checkpoints" / f"step-{steps:08d}" / f"{name}.safetensors")
                for out in ("killed", "straight"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_full_disk_names_the_checkpoint_and_keeps_the_earlier_ones(tiny_recipe, tmp_path, monkeypatch):
    import errno

    import cdmbench.training.checkpoint
    from cdmbench.errors import CheckpointError

    real, calls = cdmbench.training.checkpoint.save_file, []

    def filling(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the second checkpoint (model + ema files each) hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(cdmbench.training.checkpoint, "save_file", filling)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*step-00000004: No space left on device; free space"
    ):
        run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=quiet)
    kept = sorted(p.name for p in (tmp_path / "a" / "base8" / "checkpoints").iterdir())
    assert kept == ["step-00000002"]  # the earlier checkpoint, and no half-written one


@pytest.mark.slow
def test_bench_writes_throughput_flops_and_mfu(tiny_recipe, tmp_path):
    import json

    from click.testing import CliRunner

    from cdmbench.cascade.cost import describe
    from cdmbench.cli import cli
    from cdmbench.recipe.load import load_recipe

    accumulate = "stages.sr16.train.grad_accumulation=2"
    result = CliRunner().invoke(cli, ["bench", str(tiny_recipe), "--stage", "sr16", "--steps", "2", "--warmup", "1",
                                      "--no-compile", "--profile", "--set", accumulate, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(next(tmp_path.glob("tiny-sr16-*.json")).read_text())
    train, *sampling = report["rows"]
    assert train["what"] == "train sr16 adm-unet (eager)" and train["images/s"] > 0
    assert 0 < train["MFU"] < 1
    # FLOPs of one image's training pass, attention included (on a CPU, FlopCounterMode counts
    # SDPA's fused kernel as 0), whatever the micro-batches: as --dry-run counts them
    dry_run = describe(*load_recipe(tiny_recipe, overrides=[accumulate]), echo=lambda *_: None)
    assert train["GFLOP/image"] == pytest.approx(dry_run.loc["sr16", "GFLOP/train image"])
    assert [r["what"].split(" (")[0] for r in sampling] == ["sample base8", "sample sr16", "sample cascade to sr16"]
    assert {"device", "torch", "ceiling", "command"} <= set(report["environment"])

    where = report["breakdown"]["adm-unet (eager)"]  # --profile: where a step's time goes
    assert list(where["phases"]) == ["batch (noise, flips, augmentation, transfer)", "forward + backward",
                                     "optimizer (fused AdamW)", "EMA"] and min(where["phases"].values()) > 0
    assert where["phases"]["forward + backward"] == max(where["phases"].values())
    assert where["kinds"]["convolution"] > 0 and where["kinds"]["normalization"] > 0
    assert "aten::convolution_backward" in where["top"] and where["profiled"] == "CPU self time"
    assert "Where a training step's time goes" in next(tmp_path.glob("tiny-sr16-*.md")).read_text()


@pytest.mark.slow
def test_bench_counts_the_steps_a_truncated_stage_leaves_out(tiny_recipe, tmp_path):
    from cdmbench.training.bench import bench

    path = bench(tiny_recipe, stage="sr16", steps=1, warmup=0, compile=False, out=tmp_path, echo=lambda *_: None,
                 overrides=["stages.base8.sampler.args.steps=null", "stages.sr16.augmentation.args.mode=truncated"])
    text = path.read_text()
    # the base (T = 50) stops at s = 0.1 = (t + 1) / T for sr16: steps t = 49 .. 5
    assert "sample base8 (45 evaluations/image" in text and "sample sr16 (4 evaluations/image" in text


def test_a_bench_cut_short_keeps_what_it_measured(tiny_recipe, tmp_path, monkeypatch):
    import json

    import cdmbench.training.bench
    from cdmbench.training.bench import bench

    real = cdmbench.training.bench.training_speed

    def compile_fails(*args, compile, **kwargs):  # a compile that outlasts the job's time
        if compile:
            raise KeyboardInterrupt
        return real(*args, compile=compile, **kwargs)

    monkeypatch.setattr(cdmbench.training.bench, "training_speed", compile_fails)
    with pytest.raises(KeyboardInterrupt):
        bench(tiny_recipe, stage="sr16", steps=1, warmup=0, compile=True, out=tmp_path, echo=quiet)
    [row] = json.loads(next(tmp_path.glob("tiny-sr16-*.json")).read_text())["rows"]
    assert row["what"] == "train sr16 adm-unet (eager)" and row["images/s"] > 0
    assert "adm-unet (eager)" in next(tmp_path.glob("tiny-sr16-*.md")).read_text()


def test_bench_of_an_imagenet_recipe_needs_no_data(tmp_path, monkeypatch):
    """Synthetic batches need only the class count, known for the Hub id: no network, no data."""
    import datasets

    from cdmbench.training.bench import bench

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    small = "{channels: 32, channel_mult: [1], num_res_blocks: 1, attention_resolutions: []}"
    root = Path(__file__).resolve().parents[2]
    bench(
        root / "recipes" / "cdm_imagenet64.yaml",
        stage="base32",
        steps=1,
        warmup=0,
        compile=False,
        out=tmp_path,
        echo=quiet,
        overrides=[
            f"stages.base32.backbone.args={small}",
            "stages.base32.train.batch_size=2",
            "sample.batch_size=2",
            "stages.base32.sampler.args.steps=2",
        ],
    )
    [train, *_] = json.loads(next(tmp_path.glob("cdm-imagenet64-base32-*.json")).read_text())["rows"]
    assert train["images/s"] > 0


def test_the_matmul_ceiling_is_the_fastest_trial(monkeypatch):
    import cdmbench.training.bench

    # Start and end of each trial: 2 s, 0.5 s, 3 s. A busy moment must not lower a peak.
    readings = iter([0.0, 2.0, 10.0, 10.5, 20.0, 23.0])
    fake_clock = readings.__next__
    monkeypatch.setattr(cdmbench.training.bench.time, "perf_counter", fake_clock)
    flops, kind = cdmbench.training.bench.matmul_ceiling(torch.device("cpu"), repeats=2, trials=3)
    assert flops == 2 * 1024**3 * 2 / 0.5 and kind == "float32 1024x1024 matmul, fastest of 3"


def test_a_bench_above_the_ceiling_says_so(tiny_recipe, tmp_path, monkeypatch):
    import cdmbench.training.bench
    from cdmbench.training.bench import bench

    monkeypatch.setattr(
        cdmbench.training.bench, "matmul_ceiling", lambda device: (1.0, "a ceiling measured far too low")
    )
    bench(tiny_recipe, stage="sr16", steps=1, warmup=0, compile=False, out=tmp_path, echo=quiet)
    text = next(tmp_path.glob("tiny-sr16-*.md")).read_text()
    assert " |\n\nMFU above 100%: the ceiling was measured below the device's peak" in text


@pytest.mark.parametrize("name, kind", [
    ("aten::convolution_backward", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("aten::addmm", "matmul"),
    ("aten::native_group_norm_backward", "normalization"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>", "normalization"),
    ("triton_red_fused_native_group_norm_silu_3", "normalization"),
    ("triton_poi_fused_add_convolution_silu_7", "elementwise and other"),  # a conv's bias add, fused
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::elementwise_kernel<128, 2>", "elementwise and other"),
    ("aten::copy_", "memory and layout"),
    ("Memcpy HtoD (Pageable -> Device)", "memory and layout"),
])
def test_operators_and_kernels_fall_into_their_kind(name, kind):
    from cdmbench.training.bench import op_kind

    assert op_kind(name) == kind


def test_keep_the_newest_checkpoints_and_the_milestones(tiny_recipe, tmp_path):
    out = run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=quiet, overrides=[
        "stages.base8.train.steps=7", "stages.base8.train.checkpoint_every=1",
        "stages.base8.train.keep_checkpoints=2", "stages.base8.train.milestone_every=3"])
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "base8" / "checkpoints").iterdir())
    assert kept == [3, 6, 7]  # milestones 3 and 6, and the two newest (6, 7)


def test_gpu_process_groups_carry_cpu_tensors_on_gloo(monkeypatch):
    """Under torchrun on GPUs, NCCL takes CUDA tensors and gloo CPU ones: the per-step stop flag
    is a CPU tensor (NCCL alone would refuse it). Checked on the arguments, as CPU machines have
    no NCCL; BackendConfig is what init_process_group parses them with."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from cdmbench.runtime import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    distributed.init(torch.device("cuda:1"))
    distributed.init(torch.device("cpu"))
    (gpu, gpu_kw), (cpu, cpu_kw) = calls
    assert BackendConfig(Backend(gpu)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert gpu_kw == {"device_id": torch.device("cuda:1"), "timeout": None}  # bound: barriers use this GPU
    assert (cpu, cpu_kw) == ("gloo", {"timeout": None})  # None: torch's default


@pytest.mark.parametrize("rank", [0, 1])
def test_each_process_reads_only_its_share_and_draws_for_all(rank, monkeypatch):
    """Process `rank` of 2 reads its half of the batch's images (at both resolutions) and gets
    the same flips, noise and augmentation for it as one process that reads them all."""
    import yaml

    from cdmbench.cascade.stages import build_stage
    from cdmbench.data.images import ImageSet
    from cdmbench.recipe.validate import parse_recipe
    from cdmbench.training.trainer import make_batch
    from tests.conftest import TINY_RECIPE

    recipe, plugins = parse_recipe(yaml.safe_load(TINY_RECIPE))
    st = build_stage(plugins, recipe, recipe.stage("sr16"), num_classes=10)
    g = torch.Generator().manual_seed(0)
    images = {r: torch.randint(0, 256, (20, 3, r, r), dtype=torch.uint8, generator=g) for r in (8, 16)}
    read: list[int] = []

    class Recorded:
        def __init__(self, x):
            self.x = x

        def __getitem__(self, idx):
            read.extend(idx.tolist())
            return self.x[idx]

    idx = torch.tensor([3, 17, 5, 0, 11, 8, 2, 19])
    torch.manual_seed(1)
    alone = make_batch(st, ImageSet(images, torch.arange(20) % 10, 10, list("abcdefghij")), idx, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    torch.manual_seed(1)
    data = ImageSet({r: Recorded(x) for r, x in images.items()}, torch.arange(20) % 10, 10, list("abcdefghij"))
    shared = make_batch(st, data, idx, "cpu")
    mine = slice(4 * rank, 4 * rank + 4)
    assert sorted(read) == sorted(idx[mine].tolist() * 2)  # its 4 images at 16 and at 8 px
    for key in ("x0", "low_res", "aug_cond", "eps", "x_t", "t", "labels"):
        assert torch.equal(getattr(shared, key)[mine], getattr(alone, key)[mine]), key
    assert not torch.equal(alone.aug_cond[:4], alone.aug_cond[4:])  # per-example levels
