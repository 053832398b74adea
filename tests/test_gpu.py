"""CUDA paths: bf16 + channels_last + torch.compile training steps, and per-image seeds on the
GPU. Marked `gpu`; skipped without CUDA (run them on a GPU machine: python -m pytest -m gpu)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import yaml

from cdmbench.cascade.stages import build_stage, sample_stage
from cdmbench.recipe.validate import parse_recipe
from cdmbench.training.run import run
from tests.conftest import TINY_RECIPE
from tests.evaluation.test_classifier import _stop_at, colour_images, events_of_4_and_7_steps
from tests.training.test_run import steps_between_log_rows_make_no_more_events

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_channels_last_compiled_training_on_cuda(tiny_recipe, tmp_path):
    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None, overrides=[
        "device=cuda", "stages.base8.train.precision=bf16", "stages.base8.train.channels_last=true",
        "stages.base8.train.compile=true", "stages.sr16.train.precision=bf16"])
    log = (out / "base8" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4 and all('"peak_memory_gib"' in line for line in log)
    assert (out / "sr16" / "samples" / "grid.png").exists()


def test_an_image_does_not_depend_on_its_batch_on_cuda(monkeypatch):
    # fp32 without TF32, and no autotuning (an earlier test's Trainer switches it on): batches of 3
    # and 1 may still run other kernels, so equal within float rounding, not bit for bit
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    recipe, plugins = parse_recipe(yaml.safe_load(TINY_RECIPE), overrides=["device=cuda"])
    st = build_stage(plugins, recipe, recipe.stage("base8"), num_classes=10, device="cuda")
    model = st.backbone.eval()
    labels = torch.tensor([1, 2, 3], device="cuda")
    together = sample_stage(st, model, labels, seed=0, image_ids=[0, 1, 2], low_res=None, device="cuda",
                            progress=False)
    alone = sample_stage(st, model, labels[2:], seed=0, image_ids=[2], low_res=None, device="cuda",
                         progress=False)
    assert torch.allclose(together[2], alone[0], atol=1e-5)


def test_bench_profile_attributes_gpu_kernel_time(tiny_recipe, tmp_path):
    import json

    from click.testing import CliRunner

    from cdmbench.cli import cli

    result = CliRunner().invoke(cli, ["bench", str(tiny_recipe), "--stage", "sr16", "--steps", "2", "--warmup", "1",
                                      "--no-compile", "--profile", "--set", "device=cuda", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    where = next(iter(json.loads(next(tmp_path.glob("tiny-sr16-*.json")).read_text())["breakdown"].values()))
    assert where["profiled"] == "GPU kernel time"
    assert where["kinds"]["convolution"] > 0 and where["kinds"]["normalization"] > 0, where["top"]


@contextlib.contextmanager
def gpu_synchronisations():
    """Collects CUDA's warnings for every host-device synchronisation inside (blocking copies
    included, which the CPU test of the same property cannot see)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
            found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def test_training_steps_between_log_rows_do_not_wait_for_the_gpu(tiny_recipe, tmp_path, monkeypatch):
    steps_between_log_rows_make_no_more_events(tiny_recipe, tmp_path, monkeypatch, gpu_synchronisations, overrides=[
        "device=cuda", "stages.sr16.train.precision=bf16", "stages.sr16.train.channels_last=true"])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver-2m"])
def test_sampling_steps_do_not_wait_for_the_gpu(sampler):
    """2 and 4 sampling steps (bf16 network, classifier-free guidance) make the same number of
    host-device synchronisations."""
    def syncs(steps: int) -> list[str]:
        recipe, plugins = parse_recipe(
            yaml.safe_load(TINY_RECIPE),
            overrides=[
                "device=cuda",
                "sample.precision=bf16",
                f"stages.base8.sampler={{name: {sampler}, args: {{steps: {steps}}}}}",
                "stages.base8.guidance={label_dropout: 0.1, scale: 2.0}",
            ],
        )
        st = build_stage(plugins, recipe, recipe.stage("base8"), num_classes=10, device="cuda")
        labels = torch.arange(4, device="cuda")
        with gpu_synchronisations() as found:
            sample_stage(st, st.backbone.eval(), labels, seed=0, image_ids=[0, 1, 2, 3], low_res=None,
                         device="cuda", progress=False)
        return found

    syncs(2)  # first calls: cuDNN and allocator set-up
    assert len(syncs(2)) == len(syncs(4))


def test_classifier_steps_between_loss_reads_do_not_wait_for_the_gpu():
    """CAS's classifier: batches copied from pinned memory without blocking, the loss read every
    LOSS_EVERY steps; 4 and 7 steps synchronise alike."""
    short, long = events_of_4_and_7_steps(gpu_synchronisations, device="cuda")
    assert len(short) == len(long), (short, long)


def test_a_classifier_stopped_on_cuda_resumes_with_its_cuda_generator(tmp_path, monkeypatch):
    """The augmentation generator lives on the GPU (a 16-byte state); deterministic cuDNN, so a
    resumed training reaches the uninterrupted weights (up to atomics: a wrong state is ~1e-1 off)."""
    from cdmbench.evaluation import classifier as C

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    images, labels = colour_images(8)
    settings = dict(num_classes=8, arch="test_resnet", epochs=2, batch_size=16, seed=0, device="cuda",
                    progress=False)
    straight = C.train_classifier(images, labels, **settings).state_dict()
    state = tmp_path / "state.pt"
    with monkeypatch.context() as patch:
        _stop_at(patch, 3)
        with pytest.raises(C.Stopped, match="after step 3 of 8"):
            C.train_classifier(images, labels, state=state, **settings)
    assert len(torch.load(state, weights_only=True)["augment"]) == 16  # a CUDA generator's state
    resumed = C.train_classifier(images, labels, state=state, **settings).state_dict()
    diffs = torch.cat([(resumed[k].float() - straight[k].float()).abs().flatten() for k in straight])
    assert diffs.max() < 1e-4, diffs.max()
