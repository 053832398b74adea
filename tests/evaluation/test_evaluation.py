"""Evaluation: FID / IS math, the Inception loader (with a TorchScript stand-in), reference
statistics caching, baselines and comparability, and `cdmbench evaluate` end to end."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cdmbench.builtin.features import INCEPTION_URL, inception
from cdmbench.cli import cli
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.metrics import (
    RunningStatistics,
    bootstrap_fid_stderr,
    frechet_distance,
    inception_score,
    statistics,
)
from cdmbench.evaluation.samples import EvalContext, read_samples, sample_labels
from cdmbench.plugins import load_plugins
from cdmbench.recipe.load import load_recipe
from cdmbench.reporting.tables import baseline_frame
from cdmbench.training.run import run


def reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID in float64 numpy, with Tr((S1 S2)^(1/2)) from the eigenvalues of S1 S2 (not sqrtm)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = statistics(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_an_independent_implementation():
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(400, 12))
    f2 = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    got = frechet_distance(*statistics(f1), *statistics(f2))
    assert got == pytest.approx(reference_fid(f1, f2), rel=1e-6)


def test_bootstrap_stderr_is_the_spread_of_fid_over_resampled_copies():
    """Against the FID of each resample written out (np.repeat of the drawn counts): the frequency
    weights (the trace term is checked against scipy's sqrtm in test_metrics.py)."""
    rng = np.random.default_rng(3)
    f = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    references = [statistics(rng.normal(size=(500, 6)) + 0.5), statistics(rng.normal(size=(400, 6)) * 2)]
    got = bootstrap_fid_stderr(f, references, resamples=5, seed=7)
    draws = np.random.default_rng(7)
    fids = []
    for _ in range(5):
        copy = np.repeat(f, draws.multinomial(len(f), np.full(len(f), 1 / len(f))), axis=0)
        fids.append([frechet_distance(*statistics(copy), *ref) for ref in references])
    assert got == pytest.approx(np.std(fids, axis=0, ddof=1).tolist(), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 resamples"):
        bootstrap_fid_stderr(f, references, resamples=1)


def test_bootstrap_stderr_estimates_the_spread_of_fid_over_independent_sample_sets():
    """200 independent sets of 400 samples of N(1, I) against N(0, I)'s exact statistics: the
    standard deviation of their FIDs is the true standard error; one set's bootstrap estimate,
    averaged over 10 sets, is within 25% of it."""
    rng = np.random.default_rng(4)
    d, n = 4, 400
    reference = (np.zeros(d), np.eye(d))
    fids = [frechet_distance(*statistics(rng.normal(1.0, 1.0, size=(n, d))), *reference) for _ in range(200)]
    estimates = [bootstrap_fid_stderr(rng.normal(1.0, 1.0, size=(n, d)), [reference], resamples=50, seed=k)[0]
                 for k in range(10)]
    assert np.mean(estimates) == pytest.approx(np.std(fids, ddof=1), rel=0.25)


def test_running_statistics_over_batches_equal_the_statistics_of_all_features():
    """Streaming reference statistics (large offset, uneven batches) equal np.cov of the whole."""
    rng = np.random.default_rng(2)
    f = 1000.0 + rng.normal(size=(1037, 8)) @ rng.normal(size=(8, 8))
    running = RunningStatistics()
    for lo in range(0, len(f), 100):
        running.update(f[lo:lo + 100])
    mu, sigma = running.result()
    ref_mu, ref_sigma = statistics(f)
    assert np.allclose(mu, ref_mu, rtol=0, atol=1e-9) and np.allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        RunningStatistics().result()


def test_inception_score_closed_forms():
    constant = np.tile([0.1, 0.7, 0.2], (100, 1))
    assert inception_score(constant)[0] == pytest.approx(1.0)
    k = 7
    confident = np.eye(k)[np.arange(700) % k]  # K equiprobable classes, one-hot predictions
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0, abs=1e-6)


def test_inception_score_follows_the_definition_on_unequal_rows():
    """IS of a split = exp(mean_i KL(p(y|x_i) || p_split(y))), p_split the mean of that split's
    rows; mean and std (ddof=0, np.std as metrics uses) over the splits."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4],
                  [0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    scores = []
    for part in (p[:3], p[3:]):
        marginal = part.mean(axis=0)
        kls = [sum(q * math.log(q / m) for q, m in zip(row, marginal, strict=True)) for row in part]
        scores.append(math.exp(sum(kls) / len(kls)))
    # a marginal over all 6 rows gives (1.19881, 0.05827), a mean of exp(KL) (1.17777, 0.05812)
    mean, std = inception_score(p, splits=2)
    assert mean == pytest.approx(sum(scores) / 2, rel=1e-9)
    assert std == pytest.approx(abs(scores[0] - scores[1]) / 2, rel=1e-9)


class StandIn(nn.Module):
    """The call signature of the TorchScript Inception: forward(x in [0, 255], return_features,
    use_fp16, no_output_bias) and ``layers`` on 299x299 inputs normalised to [-1, 1]."""

    def __init__(self, dims: int = 2048):
        super().__init__()
        self.dims = dims
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(3, dims, 4))
        self.output = nn.Linear(dims, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(x.shape[0], self.dims)
        if return_features:
            return features
        logits = features @ self.output.weight.t()
        if not no_output_bias:
            logits = logits + self.output.bias
        return logits.softmax(dim=1)


def save_standin(path: Path, dims: int = 2048) -> Path:
    torch.manual_seed(0)
    torch.jit.script(StandIn(dims)).save(str(path))
    return path


@pytest.fixture
def standin_path(tmp_path) -> Path:
    return save_standin(tmp_path / "inception-2015-12-05.pt")


def test_inception_code_path_with_a_torchscript_stand_in(standin_path, tmp_path):
    net = inception(path=str(standin_path), cache_dir=tmp_path, device="cpu")
    assert net.sha256 == hashlib.sha256(standin_path.read_bytes()).hexdigest()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    for mode in ("legacy_tensorflow", "clean"):
        f = net.features(images, mode=mode)
        assert f.shape == (5, 2048) and f.dtype == torch.float64
    assert not torch.allclose(net.features(images, mode="clean"), net.features(images, mode="legacy_tensorflow"))
    clean = net.features(images, mode="clean")  # images resized on threads, each kept in its place
    assert torch.allclose(torch.cat([net.features(images[i:i + 1], mode="clean") for i in range(5)]), clean)
    p = net.probabilities(images)
    assert p.shape == (5, 1008) and torch.allclose(p.sum(1), torch.ones(5, dtype=torch.float64))


def test_missing_or_wrong_inception_file_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("CDMBENCH_INCEPTION", raising=False)
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(CdmbenchError) as info:
        inception(path=str(missing), cache_dir=tmp_path, device="cpu")
    message = str(info.value)
    assert INCEPTION_URL in message and str(missing) in message and "SHA-256" in message
    wrong = tmp_path / "wrong.pt"
    wrong.write_bytes(b"not a network")
    with pytest.raises(CdmbenchError, match="is not the TorchScript Inception network"):
        inception(path=str(wrong), cache_dir=tmp_path, device="cpu")


TINY_EVAL = ["evaluate.num_samples=30", "evaluate.shard_size=12", "evaluate.batch_size=16"]


@pytest.fixture
def trained_run(tiny_recipe, tmp_path) -> Path:
    return run(tiny_recipe, out=tmp_path / "run", progress=False, echo=lambda *_: None)


def test_evaluate_fails_before_sampling_when_inception_is_missing(trained_run, monkeypatch, tmp_path):
    monkeypatch.setenv("CDMBENCH_INCEPTION", str(tmp_path / "absent.pt"))
    result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--metrics", "fid", "--no-progress"])
    assert result.exit_code == 2 and INCEPTION_URL in result.output
    assert not list(trained_run.glob("*/eval_samples"))


@pytest.mark.slow
def test_evaluate_with_the_stand_in_caches_reference_statistics(trained_run, monkeypatch, tmp_path):
    # 64-d features: FID's matrix square root of 2048 x 2048 takes minutes on 2 cores.
    monkeypatch.setattr("cdmbench.builtin.features.INCEPTION_DIMS", 64)
    standin_path = save_standin(tmp_path / "small-inception.pt", dims=64)
    monkeypatch.setenv("CDMBENCH_INCEPTION", str(standin_path))
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    args = ["evaluate", str(trained_run), "--metrics", "fid,is", "--no-progress",
            *[f"--set={o}" for o in TINY_EVAL], "--set=data.args.num_images=24"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    stats = list((tmp_path / "cache" / "reference_stats").glob("*.npz"))
    assert len(stats) == 2  # train and test splits, legacy_tensorflow mode
    stamps = {p: p.stat().st_mtime_ns for p in stats}
    shards = sorted((trained_run / "sr16" / "eval_samples").glob("*/shard-*.npz"))
    assert [p.name.split("-", 2)[2] for p in shards] == ["0-12.npz", "12-24.npz", "24-30.npz"]
    shard_stamps = {p: p.stat().st_mtime_ns for p in shards}

    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert {p: p.stat().st_mtime_ns for p in stats} == stamps  # read from the cache
    assert {p: p.stat().st_mtime_ns for p in shards} == shard_stamps  # samples reused
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    fid = [r for r in rows if r["metric"] == "fid_train"][-1]
    assert fid["n"] == 30 and fid["protocol"]["features"] == "inception-2015-12-05"
    assert fid["protocol"]["features_sha256"] == hashlib.sha256(standin_path.read_bytes()).hexdigest()
    assert fid["protocol"]["mode"] == "legacy_tensorflow" and fid["protocol"]["reference_n"] == 24
    assert fid["stderr"] > 0 and fid["protocol"]["stderr"] == "std over 10 bootstrap resamples of the samples"
    assert {"fid_test", "is"} <= {r["metric"] for r in rows}
    assert "fid_train" in (trained_run / "report.md").read_text()


class FeatureContext:
    """What the FID metric asks of an evaluation: fixed sample features and reference features."""

    def __init__(self, features, references):
        self.features, self.references = features, references
        self.samples, self.protocol = features, {}

    def feature_network(self, spec):
        return type("Network", (), {"name": "fixed", "sha256": "-", "modes": ("native",)})()

    def sample_features(self, network, mode):
        return self.features

    def reference_statistics(self, network, mode, split):
        return (*statistics(self.references[split]), len(self.references[split]))


def test_fid_rows_carry_the_bootstrap_stderr_unless_it_is_off():
    from cdmbench.builtin.metrics import fid

    rng = np.random.default_rng(5)
    references = {"train": rng.normal(size=(200, 5)), "test": rng.normal(size=(150, 5)) + 1}
    context = FeatureContext(rng.normal(size=(120, 5)) * 1.5, references)
    rows = fid(reference=["train", "test"], bootstrap=4).evaluate(context)
    expected = bootstrap_fid_stderr(context.features, [statistics(references[k]) for k in ("train", "test")],
                                    resamples=4)
    assert [r["stderr"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert rows[1]["value"] == pytest.approx(reference_fid(context.features, references["test"]), rel=1e-6)
    assert rows[0]["protocol"]["stderr"] == "std over 4 bootstrap resamples of the samples"
    plain = fid(reference=["test"], bootstrap=0).evaluate(context)
    assert plain[0]["stderr"] is None and "stderr" not in plain[0]["protocol"]
    with pytest.raises(ValueError, match="0 \\(no stderr\\) or at least 2 resamples"):
        fid(bootstrap=1)


@pytest.fixture
def sr16_rows(monkeypatch) -> list[tuple[int, int]]:
    """(first row, rows) of each sampling of sr16 that evaluate makes."""
    import cdmbench.evaluation.samples

    sampled, real = [], cdmbench.evaluation.samples.sample_cascade

    def counting(stages, **kwargs):
        if stages[-1].spec.name == "sr16":
            sampled.append((kwargs["first_id"], len(kwargs["labels"])))
        return real(stages, **kwargs)

    monkeypatch.setattr(cdmbench.evaluation.samples, "sample_cascade", counting)
    return sampled


@pytest.mark.slow
def test_samples_serve_a_smaller_n_and_grow_to_a_larger_one(trained_run, monkeypatch, tmp_path, sr16_rows):
    sampled = sr16_rows
    monkeypatch.setattr("cdmbench.builtin.features.INCEPTION_DIMS", 64)
    monkeypatch.setenv("CDMBENCH_INCEPTION", str(save_standin(tmp_path / "small-inception.pt", dims=64)))
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))

    def evaluate(n: int) -> list[str]:
        """Evaluate n samples, check them; the shards' row ranges."""
        sampled.clear()
        result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--metrics", "is", "--no-progress",
                                          f"--num-samples={n}", *[f"--set={o}" for o in TINY_EVAL]])
        assert result.exit_code == 0, result.output
        [folder] = (trained_run / "sr16" / "eval_samples").iterdir()
        images, labels = read_samples(folder, n)
        signature = json.loads((folder / "signature.json").read_text())
        assert signature["labels"] == "random"  # the default, as published rows draw them
        assert len(images) == n and torch.equal(labels, sample_labels(
            0, n, num_classes=signature["num_classes"], seed=signature["seed"], mode="random"))
        return sorted(p.name.split("-", 2)[2] for p in folder.glob("shard-*.npz"))

    assert evaluate(18) == ["0-12.npz", "12-18.npz"]
    [first] = (trained_run / "sr16" / "eval_samples").glob("*/shard-00000-*.npz")
    made = first.stat().st_mtime_ns
    assert evaluate(30) == ["0-12.npz", "12-24.npz", "24-30.npz"]  # 12-18 replaced by 12-24
    assert sampled == [(12, 12), (24, 6)] and first.stat().st_mtime_ns == made
    assert evaluate(18) == ["0-12.npz", "12-24.npz", "24-30.npz"] and sampled == []


@pytest.mark.slow
def test_samples_of_another_shard_size_are_read_and_not_sampled_again(trained_run, monkeypatch, tmp_path,
                                                                       sr16_rows):
    sampled = sr16_rows
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))

    def evaluate(n: int, shard_size: int) -> torch.Tensor:
        sampled.clear()
        result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--metrics", "cas", "--no-progress",
                                          f"--num-samples={n}", "--set=evaluate.batch_size=16",
                                          f"--set=evaluate.shard_size={shard_size}",
                                          "--set=evaluate.metrics=[{name: cas, args: {epochs: 1}}]"])
        assert result.exit_code == 0, result.output
        images, labels = read_samples(next((trained_run / "sr16" / "eval_samples").iterdir()), n)
        assert torch.equal(labels, sample_labels(0, n, num_classes=10, seed=0, mode="random"))
        return images

    first = evaluate(20, 10)
    assert torch.equal(evaluate(20, 4), first) and sampled == []  # shards of 10 hold every row
    assert torch.equal(evaluate(24, 4)[:20], first) and sampled == [(20, 4)]  # only the rows missing


def test_data_key_names_what_determines_the_real_images(tiny_recipe, tmp_path, monkeypatch):
    def key(recipe: Path, *overrides: str) -> dict:
        parsed, plugins = load_recipe(recipe, overrides=overrides)
        return EvalContext(samples=None, labels=None, num_classes=3, resolution=8, recipe=parsed,
                           plugins=plugins, device="cpu", cache_dir=tmp_path, protocol={}).data_key("train")

    # base8 images are area-downsampled from the largest resolution: 16 here, 32 there
    assert key(tiny_recipe) != key(tiny_recipe, "stages.sr16.resolution=32")
    (tmp_path / "data" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    relative = key(tiny_recipe, "data={name: imagefolder, args: {path: data/x}}")
    assert relative == key(tiny_recipe, f"data={{name: imagefolder, args: {{path: {tmp_path / 'data' / 'x'}}}}}")


@pytest.mark.slow
def test_evaluate_under_torchrun_shards_samples_across_ranks(trained_run, standin_path, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CDMBENCH_INCEPTION": str(standin_path), "CDMBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cdmbench",
           "evaluate", str(trained_run), "--metrics", "is", "--no-progress",
           *[f"--set={o}" for o in TINY_EVAL]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    shards = sorted(p.name for p in (trained_run / "sr16" / "eval_samples").glob("*/shard-*.npz"))
    assert len(shards) == 3  # rank 0 wrote shards 0 and 2, rank 1 shard 1
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows].count("is") == 1 and rows[-1]["n"] == 30



@pytest.mark.slow
def test_cas_on_a_replaced_training_set_trains_on_every_rank(trained_run, tmp_path):
    """The paper protocol's two ResNet-50s train for hours: under torchrun every rank trains
    them (rank 0 alone would wait forever at DDP's first gradient reduction)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CDMBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cdmbench",
           "evaluate", str(trained_run), "--no-progress", REPLACING_CAS, *[f"--set={o}" for o in TINY_EVAL]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    cas = {r["metric"]: r for r in rows if r["metric"].startswith("cas")}  # rank 0's, once each
    assert sorted(r["metric"] for r in rows if r["metric"].startswith("cas")) == sorted(cas)
    assert set(cas) == {"cas_top1", "cas_top5", "cas_real_top1", "cas_real_top5"}
    assert all(r["status"] == "ok" and r["n"] == 40 and r["protocol"]["processes"] == 2 for r in cas.values())
    cached = sorted(p.suffix for p in (tmp_path / "cache" / "classifiers").iterdir())
    assert cached == [".lock", ".lock", ".safetensors", ".safetensors"]  # samples' and reference; no state left

def test_ranks_of_an_evaluation_may_finish_their_shards_hours_apart(trained_run, monkeypatch, tmp_path):
    """Each rank joins the process group once its shards are done; the group's timeout (torch's
    default: 30 minutes) must outlast the slowest rank's sampling of a million images."""
    import datetime

    import cdmbench.runtime.distributed
    from cdmbench.evaluation.evaluate import evaluate

    joined = []
    monkeypatch.setattr(cdmbench.runtime.distributed.dist, "init_process_group",
                        lambda backend, **kwargs: joined.append((backend, kwargs["timeout"])))
    monkeypatch.setattr(cdmbench.runtime.distributed.dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(cdmbench.runtime.distributed.dist, "barrier", lambda: None)
    chosen = {"base8": 2, "sr16": 2}  # rank 0's checkpoints, older than the newest (4): rank 1 uses them
    monkeypatch.setattr(cdmbench.runtime.distributed.dist, "broadcast_object_list",
                        lambda box, src, device: box.__setitem__(0, chosen))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    rows = evaluate(trained_run, metrics=["cas"], overrides=TINY_EVAL, progress=False, echo=lambda *_: None)
    assert rows == [] and joined == [("gloo", datetime.timedelta(days=7))]
    [folder] = (trained_run / "sr16" / "eval_samples").iterdir()
    assert sorted(p.name for p in folder.glob("shard-*.npz")) == ["shard-00001-12-24.npz"]  # rank 1's share
    assert [s["checkpoint_step"] for s in json.loads((folder / "signature.json").read_text())["stages"]] == [2, 2]


def test_each_metrics_rows_are_kept_as_soon_as_they_exist(trained_run, monkeypatch, tmp_path):
    """A job killed during a long metric (CAS's classifier trains for hours) keeps the others'."""
    from cdmbench.builtin.metrics import CAS
    from cdmbench.evaluation.evaluate import evaluate

    def killed(self, context):
        raise KeyboardInterrupt

    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(CAS, "evaluate", killed)
    metrics = "evaluate.metrics=[{name: is, args: {features: classifier, features_args: {epochs: 1}}}, cas]"
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained_run, overrides=[*TINY_EVAL, metrics], progress=False, echo=lambda *_: None)
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows if r["metric"].startswith(("is", "cas"))] == ["is_classifier"]


@pytest.fixture
def sampled(tmp_path, monkeypatch) -> list[list[str]]:
    """The stages of each sample_cascade call evaluate makes (a private cache)."""
    import cdmbench.evaluation.samples

    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    calls, real = [], cdmbench.evaluation.samples.sample_cascade

    def counting(stages, **kwargs):
        calls.append([s.spec.name for s in stages])
        return real(stages, **kwargs)

    monkeypatch.setattr(cdmbench.evaluation.samples, "sample_cascade", counting)
    return calls


def test_stages_conditioned_on_one_base_share_its_samples(trained_run, sampled):
    metric = "--set=evaluate.metrics=[{name: is, args: {features: classifier, features_args: {epochs: 1}}}]"
    for steps in (4, 2):  # two SR samplers stand in for two SR stages on one base
        result = CliRunner().invoke(cli, ["evaluate", str(trained_run), "--no-progress", metric,
                                          f"--set=stages.sr16.sampler.args.steps={steps}",
                                          *[f"--set={o}" for o in TINY_EVAL]])
        assert result.exit_code == 0, result.output
    assert sampled.count(["sr16"]) == 6  # 30 samples in shards of 12, for each evaluation
    assert sampled.count(["base8"]) == 3  # the base only for the first
    assert len(list((trained_run / "base8" / "eval_outputs").glob("*/outputs-*.npz"))) == 3


def test_other_weights_at_the_same_step_are_sampled_afresh(trained_run, sampled):
    """A stage trained again to the same step (e.g. after its checkpoint was found corrupt) has
    other weights: the cached samples are keyed by their SHA-256, not only by the step."""
    from safetensors.torch import load_file, save_file

    from cdmbench.training.checkpoint import MANIFEST, sha256_file

    args = ["evaluate", str(trained_run), "--no-progress", *[f"--set={o}" for o in TINY_EVAL],
            "--set=evaluate.metrics=[{name: is, args: {features: classifier, features_args: {epochs: 1}}}]"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    folder = trained_run / "sr16" / "checkpoints" / "step-00000004"
    weights = {k: v + 0.01 for k, v in load_file(folder / "ema.safetensors").items()}
    save_file(weights, folder / "ema.safetensors")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["ema.safetensors"] = {"size": (folder / "ema.safetensors").stat().st_size,
                                   "sha256": sha256_file(folder / "ema.safetensors")}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert sampled.count(["sr16"]) == 6 and sampled.count(["base8"]) == 3  # sr16 again, the base reused
    assert len(list((trained_run / "sr16" / "eval_samples").glob("*/signature.json"))) == 2


@pytest.mark.slow
def test_evaluate_with_classifier_features_end_to_end(tiny_recipe, trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    classifier = "{features: classifier, features_args: {epochs: 1}}"
    metrics = (
        f"[{{name: fid, args: {classifier}}}, {{name: is, args: {classifier}}}, {{name: cas, args: {{epochs: 1}}}}]"
    )
    # `prepare --metrics` trains the feature classifier and the reference statistics ahead ...
    ahead = CliRunner().invoke(cli, ["prepare", str(tiny_recipe), "--split", "test", "--metrics", "sr16",
                                     "--no-progress", f"--set=evaluate.metrics={metrics}"])
    assert ahead.exit_code == 0, ahead.output
    assert len(list((tmp_path / "cache" / "reference_stats").glob("*.npz"))) == 2  # fid vs train and test

    [features] = (tmp_path / "cache" / "classifiers").glob("*.safetensors")
    made = features.stat().st_mtime_ns
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            str(trained_run),
            "--no-progress",
            f"--set=evaluate.metrics={metrics}",
            *[f"--set={o}" for o in TINY_EVAL],
            "--set=evaluate.labels=balanced",  # CAS's real reference: 30 samples of 4-image classes
        ],
    )
    assert result.exit_code == 0, result.output
    assert features.stat().st_mtime_ns == made  # ... so evaluate used it, not a retrained one
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    found = {
        r["metric"]: r for r in rows if r["stage"] == "sr16" and "features" in r["protocol"] or "cas" in r["metric"]
    }
    assert {"fid_train", "fid_test", "is_classifier", "cas_top1", "cas_top5", "cas_real_top1"} <= set(found)
    assert all(found[m]["status"] == "ok" for m in found)
    fid = found["fid_test"]["protocol"]
    assert fid["features"] == "classifier" and fid["mode"] == "native" and len(fid["features_sha256"]) == 64
    assert found["cas_top1"]["protocol"]["scaled_down"] is True
    assert found["cas_top1"]["unit"] == "%" and 0 <= found["cas_top1"]["value"] <= 100
    # the feature classifier, trained once, CAS's real-data reference and the samples' classifier
    assert len(list((tmp_path / "cache" / "classifiers").glob("*.safetensors"))) == 3
    report = CliRunner().invoke(cli, ["report", str(trained_run)])
    assert report.exit_code == 0 and re.search(r"\| sr16 +\| fid_test +\| [\d.]+ +\| [\d.]+ ", report.output)
    assert "features: classifier" in report.output  # its protocol, listed once


REPLACING_CAS = "--set=evaluate.metrics=[{name: cas, args: {epochs: 1, replace_training_set: true}}]"


@pytest.mark.slow
def test_cas_can_train_on_a_generated_replacement_of_the_training_set(trained_run, sampled):
    """Ravuri & Vinyals' protocol: one sample per training image, of its class, memory-mapped."""
    from cdmbench.evaluation.samples import read_training_set

    args = ["evaluate", str(trained_run), "--no-progress", REPLACING_CAS, *[f"--set={o}" for o in TINY_EVAL]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "40 generated images of sr16, one per training image" in result.output
    [folder] = (trained_run / "sr16" / "training_sets").iterdir()
    images, labels = read_training_set(folder)
    assert images.shape == (40, 3, 16, 16) and torch.equal(labels, torch.arange(40) % 10)  # shapes' labels
    # image i has evaluation sample i's seed: the same image where it has its (random) label too
    samples, sample_classes = read_samples(next((trained_run / "sr16" / "eval_samples").iterdir()), 30)
    same = labels[:30] == sample_classes
    assert 0 < same.sum() < 30 and torch.equal(images[:30][same], samples[same])
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    top1 = next(r for r in rows if r["metric"] == "cas_top1")
    assert top1["n"] == 40 and top1["protocol"]["train_images"] == 40 and top1["protocol"]["n"] == 40
    assert top1["protocol"]["samples"] == f"sr16/training_sets/{folder.name}"
    assert top1["protocol"]["scaled_down"] is True

    # an interrupted generation resumes at the shards not done, and the images come out the same
    (folder / "done" / "000001").unlink()
    with pytest.raises(CdmbenchError, match=r"holds 3 of 4 shards of generated training images; run "
                                            r"cdmbench evaluate again \(on every rank\)"):
        read_training_set(folder)
    kept = images.clone()
    np.load(folder / "images.npy", mmap_mode="r+")[12:24] = 0
    sampled.clear()
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert sampled == [["base8"], ["sr16"]]  # shard 1 only (the evaluation samples are reused)
    assert torch.equal(read_training_set(folder)[0], kept)


def test_a_generated_training_set_is_the_cascade_sampled_for_its_labels(trained_run, monkeypatch):
    import cdmbench.storage.files
    from cdmbench.cascade.stages import build_chain, sample_cascade
    from cdmbench.data.images import to_uint8
    from cdmbench.evaluation.samples import generate_training_set, load_chain, read_training_set
    from cdmbench.storage.rundir import load_run

    _, recipe, plugins = load_run(trained_run)
    chain = build_chain(plugins, recipe, "sr16", 10, "cpu")
    steps = load_chain(chain, trained_run)
    labels = torch.tensor([2, 2, 0, 1, 0])
    folder = generate_training_set(chain, run_path=trained_run, checkpoint_steps=steps, labels=labels,
                                   num_classes=10, seed=5, batch_size=4, shard_size=2, device="cpu",
                                   progress=False)
    images, got = read_training_set(folder)
    assert torch.equal(got, labels) and sorted(p.name for p in (folder / "done").iterdir()) == [
        "000000", "000001", "000002"]
    expected, _ = sample_cascade(chain, {st.spec.name: st.backbone for st in chain}, labels, seed=5,
                                 batch_size=5, device="cpu", progress=False)
    assert torch.equal(images, to_uint8(expected["sr16"]))

    # the file is sparse: a resume checks the rows still to write against the space left then
    (folder / "done" / "000001").unlink()
    real = cdmbench.storage.files.shutil.disk_usage
    monkeypatch.setattr(cdmbench.storage.files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CdmbenchError, match=f"they need {2 * 3 * 16 * 16} more bytes .* free space there"):
        generate_training_set(chain, run_path=trained_run, checkpoint_steps=steps, labels=labels,
                              num_classes=10, seed=5, batch_size=4, shard_size=2, device="cpu", progress=False)


@pytest.mark.slow
def test_the_paper_protocol_end_to_end_at_a_tiny_scale(trained_run, monkeypatch, tmp_path):
    """Ravuri & Vinyals' settings shrunk to the tiny run (ResNet-50, 90 epochs, 1000 classes and
    1,281,167 images are checked as these): the paper's optimiser and no 'scaled down' mark."""
    import cdmbench.evaluation.cas

    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(cdmbench.evaluation.cas.PAPER, "classifier", "test_resnet")
    monkeypatch.setitem(cdmbench.evaluation.cas.PAPER, "epochs", 1)
    monkeypatch.setitem(cdmbench.evaluation.cas.PAPER, "num_classes", 10)
    monkeypatch.setitem(cdmbench.evaluation.cas.PAPER, "batch_size", 16)
    monkeypatch.setitem(cdmbench.evaluation.cas.PAPER, "train_images", 40)
    args = ["evaluate", str(trained_run), "--no-progress", *[f"--set={o}" for o in TINY_EVAL]]
    metric = ("--set=evaluate.metrics=[{name: cas, args: {arch: test_resnet, epochs: %d, batch_size: 16, "
              "paper_protocol: true}}]")

    wrong = CliRunner().invoke(cli, [*args, metric % 2])
    assert wrong.exit_code == 2 and "cas: paper_protocol needs {'epochs': 1}" in wrong.output
    assert not (trained_run / "sr16" / "eval_samples").exists()  # refused before any sampling

    result = CliRunner().invoke(cli, [*args, metric % 1])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    cas = {r["metric"]: r for r in rows if r["metric"].startswith("cas")}
    assert set(cas) == {"cas_top1", "cas_top5", "cas_real_top1", "cas_real_top5"}
    assert all(r["status"] == "ok" and r["n"] == 40 for r in cas.values())
    protocol = cas["cas_top1"]["protocol"]
    assert protocol["scaled_down"] is False and protocol["note"] == "paper protocol"
    assert protocol["samples"].startswith("sr16/training_sets/") and protocol["train_images"] == 40


@pytest.mark.slow
def test_evaluate_under_torchrun_shares_the_generated_training_set(trained_run, standin_path, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "CDMBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cdmbench",
           "evaluate", str(trained_run), "--no-progress", REPLACING_CAS, *[f"--set={o}" for o in TINY_EVAL]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [folder] = (trained_run / "sr16" / "training_sets").iterdir()
    assert sorted(p.name for p in (folder / "done").iterdir()) == ["000000", "000001", "000002", "000003"]
    rows = [json.loads(line) for line in (trained_run / "results.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows].count("cas_top1") == 1 and rows[-1]["n"] == 40


def test_a_metric_that_fails_in_any_way_leaves_the_others_rows():
    from types import SimpleNamespace

    from cdmbench.evaluation.evaluate import metric_rows

    class Broken:
        name = "broken"

        def evaluate(self, context):
            raise TypeError("a bug in a plugin")

    class Works:
        name = "works"

        def evaluate(self, context):
            return [{"metric": "works", "value": 1.0}]

    context = SimpleNamespace(protocol={"n": 30}, training_set=None)
    said = []
    rows = metric_rows([Broken(), Works()], context, said.append)
    assert rows[0]["status"] == "failed" and rows[0]["protocol"] == {"n": 30, "error": "TypeError: a bug in a plugin"}
    assert rows[1] == {"metric": "works", "value": 1.0} and said == [
        "metric broken failed: TypeError: a bug in a plugin"
    ]


def test_a_metric_stopped_by_a_signal_stops_the_evaluation_instead_of_failing():
    """A failed row would be recorded while the job is being preempted, and the next metric begun."""
    from types import SimpleNamespace

    from cdmbench.errors import Stopped
    from cdmbench.evaluation.evaluate import metric_rows

    class Preempted:
        name = "cas"

        def evaluate(self, context):
            raise Stopped("training resnet50 stopped by SIGTERM after step 7 of 90")

    class Next:
        name = "next"

        def evaluate(self, context):
            raise AssertionError("begun after the stop")

    with pytest.raises(Stopped, match="SIGTERM"):
        metric_rows([Preempted(), Next()], SimpleNamespace(protocol={"n": 30}, training_set=None), print)


def test_a_sweep_leaves_out_cas_on_a_replaced_training_set(trained_run, monkeypatch, tmp_path):
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli, ["sweep", str(trained_run), "--stage", "sr16", "--levels", "0.1",
                                      "--no-progress", REPLACING_CAS, *[f"--set={o}" for o in TINY_EVAL]])
    assert result.exit_code == 2 and "not computing cas with replace_training_set" in result.output
    assert "no metric to sweep" in result.output
    assert not (trained_run / "sr16" / "training_sets").exists()


def test_the_paper_protocol_cannot_keep_the_training_set():
    from cdmbench.builtin.metrics import cas

    assert cas(paper_protocol=True).replaces_training_set and not cas().replaces_training_set
    with pytest.raises(ValueError, match="leave replace_training_set unset or true"):
        cas(paper_protocol=True, replace_training_set=False)


def test_comparison_table_pairs_rows_of_the_same_dataset_and_resolution():
    import pandas as pd

    from cdmbench.reporting.tables import comparison_table

    protocol = {"dataset": "imagenet", "resolution": 256, "n": 10000, "labels": "random", "evaluator": "adm-evaluator",
                "reference": "VIRTUAL_imagenet256_labeled.npz"}
    results = pd.DataFrame([
        {"run": "a", "stage": "sr256", "metric": "fid_train", "value": 9.0, "status": "ok", "protocol": protocol},
        {"run": "b", "stage": "sr32", "metric": "fid_train", "value": 50.0, "status": "ok",
         "protocol": {**protocol, "dataset": "shapes", "resolution": 32}}])
    table = comparison_table(results, baseline_frame(load_plugins()))
    a = table[table.run == "a"]
    assert set(a["published res"]) == {256} and "CDM" in set(a["published model"])
    verdicts = dict(zip(a["published model"], a.comparable, strict=True))  # ADM's rows share their verdict
    assert verdicts["ADM"] == "no: n 10000 vs 50000"  # the same evaluator, reference and labels as ADM's
    assert "n 10000 vs 50000" in verdicts["CDM"] and "evaluator 'adm-evaluator' vs 'authors'" in verdicts["CDM"]
    b = table[table.run == "b"]
    assert len(b) == 1 and b.comparable.iloc[0] == "no: published rows are on imagenet, not 'shapes'"
