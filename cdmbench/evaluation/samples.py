"""Samples for evaluation: generated once per signature, in resumable shards, and the context metrics get.

Samples: N images from the cascade up to a stage, of classes drawn uniformly at random as ADM and
EDM draw them, or class-balanced (``evaluate.labels``: ``sample_labels``), image i seeded by
(sample seed, stage, i) only, stored as uint8 npz shards under
``<run>/<stage>/eval_samples/<signature>/`` (the signature hashes everything that determines the
pixels: samplers, guidance, augmentation, checkpoint steps and weights (their SHA-256), seed and
label sampling).
Shards already written are kept, so an interrupted evaluation resumes, and rows already held by
any shard (of a larger or smaller N, or another shard size) are not sampled again; a shard of the
same start but fewer rows is replaced. Under torchrun, rank r writes shards r, r + W, ...

CAS as Ravuri & Vinyals trains on a generated copy of the training set instead: one image per
training image, of its class (``generate_training_set``), in one memory-mapped array under
``<run>/<stage>/training_sets/<signature>/``.

Metrics read an ``EvalContext``: the samples (and that training set, when a metric asked for
it), the real data of any split at the stage's resolution, feature networks (built from the
``features`` registry), and cached reference statistics.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from cdmbench.cascade.stages import StageModel, guide_of, sample_cascade
from cdmbench.data.images import to_uint8
from cdmbench.data.prepare import cache_folder, make_dataset, split_images
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.metrics import RunningStatistics
from cdmbench.interfaces import FeatureNetwork
from cdmbench.plugins import Plugins
from cdmbench.recipe.components import make_component
from cdmbench.recipe.schema import Component, Recipe
from cdmbench.runtime.progress import bar
from cdmbench.storage.cache import digest
from cdmbench.storage.files import (
    allocate_arrays,
    atomic_write,
    cached_tensor,
    check_free_space,
    done_marker,
    locked,
    mapped_tensor,
    save_npz,
    write_rows,
)
from cdmbench.training.checkpoint import ema_weights_sha256, list_checkpoints, load_ema, weights_sha256
from cdmbench.training.posthoc_ema import posthoc_path, posthoc_weights

FEATURE_BATCH = 100
LAYOUT = "layout.json"
LABELS = ("random", "balanced")  # evaluate.labels
_LABEL_STREAM = 0x6C6162656C73  # "labels": the second word of the Philox key, apart from other streams


def sample_labels(lo: int, hi: int, *, num_classes: int, seed: int, mode: str) -> Tensor:
    """The classes (int64) of evaluation samples lo..hi-1. ``balanced``: i mod K. ``random``: uniform
    i.i.d., as ADM's and EDM's evaluations draw them: label i is word i of the counter-based Philox
    stream keyed by (``seed``, labels), mod K (a bias under K / 2^64), so it depends on (seed, i)
    only, the same at any batch size, shard size and number of processes."""
    if mode == "balanced":
        return torch.arange(lo, hi) % num_classes
    if mode != "random":
        raise CdmbenchError(f"evaluate.labels: expected {' or '.join(LABELS)}, got {mode!r}")
    first = lo // 4  # each Philox counter value gives 4 words
    words = np.random.Philox(key=[seed, _LABEL_STREAM], counter=first).random_raw(hi - 4 * first)
    return torch.from_numpy((words[lo - 4 * first:] % np.uint64(num_classes)).astype(np.int64))


# --- samples ----------------------------------------------------------------------------------

def chain_to(stages: list[StageModel], name: str) -> list[StageModel]:
    """The stages that produce stage ``name``'s samples, base first."""
    by_name = {s.spec.name: s for s in stages}
    chain = [by_name[name]]
    while chain[0].spec.condition_on is not None:
        chain.insert(0, by_name[chain[0].spec.condition_on])
    return chain


def load_chain(chain: list[StageModel], run_path: Path, steps: dict[str, int] | None = None) -> dict[str, int]:
    """Load the EMA weights of every stage of ``chain``: of the newest readable checkpoint, or of
    checkpoint ``steps[stage]``, and its autoguidance guide's (``load_guide``); returns each
    stage's checkpoint step (and each guide's, as ``<stage>/guide``)."""
    loaded = {}
    for st in chain:
        loaded[st.spec.name] = load_ema(run_path / st.spec.name / "checkpoints", st.backbone,
                                        step=None if steps is None else steps[st.spec.name])
        load_posthoc(st, run_path, loaded[st.spec.name])
        st.backbone.eval()
        loaded.update(load_guide(st, run_path, steps))
    return loaded


def load_guide(st: StageModel, run_path: Path, steps: dict[str, int] | None = None) -> dict[str, int]:
    """The EMA weights of ``st``'s autoguidance guide into ``st.guide``: this stage's at
    ``guidance.guide_step``, or ``guide_stage``'s newest (``steps["<stage>/guide"]`` when another
    process chose it); returns {"<stage>/guide": its step}, or {} without a guide."""
    name = guide_of(st.spec)
    if name is None:
        return {}
    folder, key, step = run_path / name / "checkpoints", f"{st.spec.name}/guide", st.spec.guidance.guide_step
    if step is not None and not (folder / f"step-{step:08d}").is_dir():
        kept = ", ".join(p.name.removeprefix("step-").lstrip("0") for p in list_checkpoints(folder)) or "none"
        raise CdmbenchError(f"stages.{st.spec.name}.guidance.guide_step={step}: {folder} has no checkpoint of that "
                            f"step (kept: {kept}); keep it with train.milestone_every (a divisor of {step}) and "
                            "train again, or guide with a kept step")
    loaded = load_ema(folder, st.guide, step=steps[key] if steps and key in steps else step)
    st.guide.eval()
    return {key: loaded}


def load_posthoc(st: StageModel, run_path: Path, step: int) -> None:
    """With ``posthoc_sigma_rel``, the stage's post-hoc EMA at ``step`` into its network
    (reconstructed the first time: ``posthoc_weights``)."""
    if st.spec.posthoc_sigma_rel is not None:
        path, _ = posthoc_weights(run_path / st.spec.name, st.spec.posthoc_sigma_rel, step)
        st.backbone.load_state_dict(load_file(path))


def weights_identity(st: StageModel, run_path: Path, step: int) -> str:
    """The ``weights_sha256`` of the weights stage ``st`` samples with at checkpoint ``step``."""
    if st.spec.posthoc_sigma_rel is None:
        return ema_weights_sha256(run_path / st.spec.name / "checkpoints", step)
    return weights_sha256(posthoc_path(run_path / st.spec.name, st.spec.posthoc_sigma_rel, step))


def sample_signature(chain: list[StageModel], *, run_path: Path, checkpoint_steps: dict[str, int],
                     seed: int, num_classes: int) -> dict[str, Any]:
    """What determines the pixels of the last stage's sample i, given its label: each stage's
    checkpoint (step and the SHA-256 of its weights), sampler, guidance, precision and
    augmentation with its sampling level, and the sample seed."""
    return {"seed": seed, "num_classes": num_classes, "stages": [
        {"name": st.spec.name, "checkpoint_step": checkpoint_steps[st.spec.name],
         "weights": weights_identity(st, run_path, checkpoint_steps[st.spec.name]),
         **({"guide": {"stage": guide_of(st.spec), "step": checkpoint_steps[f"{st.spec.name}/guide"],
                       "weights": ema_weights_sha256(run_path / guide_of(st.spec) / "checkpoints",
                                                     checkpoint_steps[f"{st.spec.name}/guide"])}}
            if guide_of(st.spec) else {}),
         "sampler": {"name": st.spec.sampler.name, "args": st.spec.sampler.args},
         "guidance_scale": st.spec.guidance.scale, "precision": st.sample_precision,
         **({"guidance_interval": list(st.spec.guidance.interval)} if st.spec.guidance.interval else {}),
         "augmentation": [{"name": a.name, "args": a.args} for a in st.spec.augmentations()],
         "levels": [p.level for p in getattr(st.augmentation, "parts", [st.augmentation])
                    if hasattr(p, "level")]}
        for st in chain]}


def sampling_protocol(chain: list[StageModel]) -> dict[str, dict[str, Any]]:
    """Each stage's sampling precision and guidance scale (1: none), as result rows record them
    beside ``samplers``."""
    return {"precision": {st.spec.name: st.sample_precision for st in chain},
            "guidance": {st.spec.name: st.spec.guidance.scale for st in chain}}


def _sample_rows(chain: list[StageModel], labels: Tensor, *, first_id: int, seed: int, batch_size: int,
                 device: torch.device | str, inputs: Path | None = None) -> Tensor:
    """uint8 (n, 3, R, R): the last stage's images ``first_id``.. for ``labels``. The previous
    stage's output it takes (z_0, or z_s when truncated) is read from, or saved to, the npz
    ``inputs`` when given."""
    *previous, last = chain
    sample = functools.partial(sample_cascade, models={st.spec.name: st.backbone for st in chain},
                               labels=labels, seed=seed, batch_size=batch_size, device=device,
                               progress=False, first_id=first_id)
    given = {}
    if previous:
        name = previous[-1].spec.name

        def make() -> Tensor:
            return sample(previous, stop_at={name: last.truncation})[0][name]

        given[name] = make() if inputs is None else cached_tensor(inputs, make)
    images, _ = sample([last], given=given)
    return to_uint8(images[last.spec.name])


def _my_shards(num_rows: int, shard_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(k, lo, hi) of the shards of ``num_rows`` rows that process ``rank`` of ``world_size`` makes."""
    return [(k, k * shard_size, min((k + 1) * shard_size, num_rows))
            for k in range(math.ceil(num_rows / shard_size)) if k % world_size == rank]


def _rows(shards) -> int:
    """How many rows the (k, lo, hi) ``shards`` hold."""
    return sum(hi - lo for _, lo, hi in shards)


def generate_samples(chain: list[StageModel], *, run_path: Path, checkpoint_steps: dict[str, int],
                     num_samples: int, num_classes: int, seed: int, batch_size: int,
                     shard_size: int, device: torch.device | str, labels: str = "random",
                     progress: bool = True, rank: int = 0,
                     world_size: int = 1) -> tuple[Path, dict[str, Any]]:
    """Write the missing shards of the last stage's samples, of classes ``sample_labels(mode=labels)``;
    returns the folder and signature (which holds the label sampling).

    The previous stages' output (float32, per shard) is cached too, in
    ``<previous stage>/eval_outputs/``, so every SR stage conditioned on one base (an ablation)
    samples that base once."""
    signature = {**sample_signature(chain, run_path=run_path, checkpoint_steps=checkpoint_steps, seed=seed,
                                    num_classes=num_classes), "labels": labels}
    classes = sample_labels(0, num_samples, num_classes=num_classes, seed=seed, mode=labels)
    folder = run_path / chain[-1].spec.name / "eval_samples" / digest(signature, 12)
    atomic_write(folder / "signature.json", json.dumps(signature, indent=1, default=str))  # by every rank
    *previous, last = chain
    inputs = (run_path / previous[-1].spec.name / "eval_outputs" / digest(
        {**signature, "stages": signature["stages"][:-1], "level": last.truncation}, 12)) if previous else None
    write_shards(folder, labels=classes, shard_size=shard_size, rank=rank,
                 world_size=world_size, progress=progress, make=lambda k, lo, hi: _sample_rows(
                     chain, classes[lo:hi], first_id=lo, seed=seed, batch_size=batch_size,
                     device=device, inputs=None if inputs is None else inputs / f"outputs-{k:05d}-{lo}-{hi}.npz"))
    return folder, signature


def write_shards(folder: Path, *, labels: Tensor, shard_size: int,
                 make: Callable[[int, int, int], Tensor], rank: int = 0, world_size: int = 1,
                 progress: bool = True) -> None:
    """Write this rank's missing shards of ``len(labels)`` samples, sample i of class ``labels[i]``
    (``sample_labels``), into ``folder``: ``make(k, lo, hi)`` gives shard k's rows lo..hi, uint8
    (n, 3, R, R). Rows that shards of another N or shard size hold are not made again."""
    mine = _my_shards(len(labels), shard_size, rank, world_size)
    todo = [(k, lo, hi) for k, lo, hi in mine if _covering(folder, lo, hi)[1] != hi]
    for k, lo, hi in bar(todo, total=len(mine), initial=len(mine) - len(todo), progress=progress,
                         desc="eval samples", unit="shard"):  # the rate and time left count new shards only
        if _covering(folder, lo, hi)[1] == hi:  # written meanwhile by a concurrent job
            continue
        existing = list(folder.glob(f"shard-{k:05d}-{lo}-*.npz"))
        images = make(k, lo, hi)
        save_npz(folder / f"shard-{k:05d}-{lo}-{hi}.npz", images=images.permute(0, 2, 3, 1).numpy(),
                 labels=labels[lo:hi].numpy())  # NHWC, as ADM's npz
        for shorter in existing:  # written for a smaller N; this shard covers its rows
            shorter.unlink(missing_ok=True)


def _span(path: Path) -> tuple[int, int]:
    """The rows [lo, hi) of shard file ``shard-<k>-<lo>-<hi>.npz``."""
    lo, hi = path.stem.split("-")[2:]
    return int(lo), int(hi)


def _covering(folder: Path, lo: int, hi: int) -> tuple[list[tuple[Path, int, int]], int]:
    """The shard files of ``folder`` that hold rows ``lo``.. in order, each with the rows [a, b) to
    take from it (at each row the file that reaches furthest), and the row where they stop: ``hi``,
    or the first row no file holds."""
    spans = [(_span(p), p) for p in folder.glob("shard-*.npz")]
    pieces, row = [], lo
    while row < hi:
        reaching = [(b, a, p) for (a, b), p in spans if a <= row < b]
        if not reaching:
            break
        b, a, path = max(reaching)
        pieces.append((path, row - a, min(b, hi) - a))
        row = min(b, hi)
    return pieces, row


def read_samples(folder: Path, num_samples: int) -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` samples of a folder of shards, as uint8 (N, 3, H, W) and labels,
    from whichever shards hold them (written for other N or shard sizes too)."""
    pieces, have = _covering(folder, 0, num_samples)
    if have < num_samples:
        raise CdmbenchError(f"{folder} holds {have} of {num_samples} samples; run cdmbench evaluate "
                            "again (on every rank) to finish them")
    images = labels = None
    row = 0
    for path, a, b in pieces:
        try:
            with np.load(path) as data:
                part = torch.from_numpy(data["images"][a:b]).permute(0, 3, 1, 2)
                part_labels = torch.from_numpy(data["labels"][a:b])
        except Exception as exc:
            raise CdmbenchError(f"sample shard {path} is unreadable ({exc}); delete it and run "
                                "cdmbench evaluate again to regenerate it") from None
        if images is None:  # filled in place: no second copy of the whole set
            images = torch.empty((num_samples, *part.shape[1:]), dtype=torch.uint8)
            labels = torch.empty(num_samples, dtype=part_labels.dtype)
        images[row:row + len(part)], labels[row:row + len(part)] = part, part_labels
        row += len(part)
    return images, labels


@dataclass
class SampleSet:
    """Generated images, uint8 (N, 3, H, W), with their labels, and what describes them in a
    result's protocol."""

    images: Tensor
    labels: Tensor
    protocol: dict[str, Any]


def generate_training_set(chain: list[StageModel], *, run_path: Path, checkpoint_steps: dict[str, int],
                          labels: Tensor, num_classes: int, seed: int, batch_size: int, shard_size: int,
                          device: torch.device | str, progress: bool = True, rank: int = 0,
                          world_size: int = 1) -> Path:
    """A generated replacement of the training set: image i of the last stage has class
    ``labels[i]`` (the training split's labels, in order) and the per-image seed of evaluation
    sample i. CAS's paper protocol trains on it: 1,281,167 images for ImageNet, which neither
    fit in memory (252 GB at 256x256) nor suit the npz shards of ``generate_samples``.

    Stored under ``<run>/<stage>/training_sets/<signature digest>/``: ``images.npy`` (one
    memory-mappable array, allocated once after a free-space check), ``labels.npy``,
    ``signature.json`` and ``done/<k>``, written after shard k's rows are on disk. Resumable;
    under torchrun rank r makes shards r, r + W, ... The previous stages' outputs are not cached
    (they would take as much disk again)."""
    signature = {**sample_signature(chain, run_path=run_path, checkpoint_steps=checkpoint_steps, seed=seed,
                                    num_classes=num_classes),
                 "labels": {"n": len(labels), "sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest()}}
    folder = run_path / chain[-1].spec.name / "training_sets" / digest(signature, 12)
    r = chain[-1].spec.resolution
    fix = f"free space there (the run directory {run_path}) or evaluate a copy of the run on a larger disk"
    with locked(folder / "images.npy"):  # the first process allocates; the others find it
        if not (folder / LAYOUT).exists():
            allocate_arrays(folder, {"images.npy": (np.uint8, (len(labels), 3, r, r))}, fix)
            (folder / "done").mkdir(exist_ok=True)
            buffer = io.BytesIO()
            np.save(buffer, labels.numpy().astype(np.int64))
            atomic_write(folder / "labels.npy", buffer.getvalue())
            atomic_write(folder / "signature.json", json.dumps(signature, indent=1, default=str))
            atomic_write(folder / LAYOUT, json.dumps({"num_images": len(labels), "shard_size": shard_size}))
    shard_size = json.loads((folder / LAYOUT).read_text())["shard_size"]  # the first run's: markers name its shards
    left = {shard for shard in _my_shards(len(labels), shard_size, 0, 1) if not done_marker(folder, shard[0]).exists()}
    check_free_space(folder, _rows(left) * 3 * r * r, fix)  # every rank's rows still to write (sparse)
    mine = _my_shards(len(labels), shard_size, rank, world_size)
    todo = [shard for shard in mine if shard in left]
    with bar(total=_rows(mine), initial=_rows(mine) - _rows(todo), unit="img",
             desc=f"training set of {chain[-1].spec.name}", progress=progress) as shown:
        for k, lo, hi in todo:
            images = _sample_rows(chain, labels[lo:hi], first_id=lo, seed=seed, batch_size=batch_size,
                                  device=device)
            write_rows(folder / "images.npy", lo, images.numpy())
            done_marker(folder, k).touch()
            shown.update(hi - lo)
    return folder


def read_training_set(folder: Path) -> tuple[Tensor, Tensor]:
    """The images (memory-mapped, uint8 (N, 3, H, W)) and labels of a complete training set."""
    layout = json.loads((folder / LAYOUT).read_text())
    shards = math.ceil(layout["num_images"] / layout["shard_size"])
    missing = [k for k in range(shards) if not done_marker(folder, k).exists()]
    if missing:
        raise CdmbenchError(f"{folder} holds {shards - len(missing)} of {shards} shards of generated "
                            "training images; run cdmbench evaluate again (on every rank) to finish them")
    return mapped_tensor(folder / "images.npy"), torch.from_numpy(np.load(folder / "labels.npy"))


# --- the context metrics read -----------------------------------------------------------------

@dataclass
class EvalContext:
    """What a metric may use. ``protocol`` describes the samples (dataset, resolution, n, seeds,
    samplers) and goes into every row."""

    samples: Tensor  # uint8 (N, 3, H, W)
    labels: Tensor
    num_classes: int
    resolution: int
    recipe: Recipe
    plugins: Plugins
    device: torch.device | str
    cache_dir: Path
    protocol: dict[str, Any]
    progress: bool = True
    stage: str = ""  # the stage whose samples are evaluated
    training_set: SampleSet | None = None  # generated replacement of the training set, if a metric asked
    echo: Callable[[str], None] = print
    _networks: dict[str, FeatureNetwork] = field(default_factory=dict)
    _features: dict[tuple[str, str, str], Tensor] = field(default_factory=dict)
    _real: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def real(self, split: str) -> tuple[Tensor, Tensor]:
        """All images of a split of the recipe's dataset at the stage resolution (area
        downsampled), uint8 (N, 3, H, W), and labels."""
        return self.real_at(split, self.resolution)

    def real_at(self, split: str, resolution: int) -> tuple[Tensor, Tensor]:
        """As ``real`` at ``resolution``: memory-mapped when the split is prepared at it (index
        batches of it; a whole-set ``.float()`` or ``torch.cat`` would read it all into memory)."""
        key = f"{split}@{resolution}"
        if key not in self._real:
            data = split_images(self.recipe, make_dataset(self.plugins, self.recipe, split), split,
                                [resolution], progress=self.progress, echo=self.echo)
            self._real[key] = (data.images[resolution], data.labels)
        return self._real[key]

    def set_samples(self, samples: Tensor, labels: Tensor, protocol: dict[str, Any]) -> None:
        """Evaluate other samples (a sweep's next level); ``protocol`` updates the rows'."""
        self.samples, self.labels = samples, labels
        self.protocol = {**self.protocol, **protocol, "n": len(samples)}
        self._features.clear()

    def data_key(self, split: str) -> dict[str, Any]:
        """Names the real images of ``split`` at the stage resolution, for caches: the prepared
        data's key (data with resolved paths, split, the cascade's resolutions, whose largest the
        images are resized to first) and the resolution."""
        return {"data": cache_folder(self.recipe, split).name, "resolution": self.resolution}

    def feature_network(self, spec: Component) -> FeatureNetwork:
        key = digest({"name": spec.name, "args": spec.args})
        if key not in self._networks:
            self._networks[key] = make_component(
                self.plugins, "features", spec, f"features '{spec.name}'",
                num_classes=self.num_classes, resolution=self.resolution,
                train_data=lambda: self.real("train"), data_key=self.data_key("train"),
                cache_dir=self.cache_dir, device=self.device, progress=self.progress)
        return self._networks[key]

    def _batched(self, fn, images: Tensor, desc: str) -> Tensor:
        return torch.cat([fn(images[i:i + FEATURE_BATCH])
                          for i in tqdm(range(0, len(images), FEATURE_BATCH), desc=desc, leave=False,
                                        disable=not self.progress)])

    def features(self, network: FeatureNetwork, images: Tensor, mode: str) -> Tensor:
        return self._batched(lambda x: network.features(x, mode=mode), images, f"{network.name} features")

    def sample_probabilities(self, network: FeatureNetwork) -> Tensor:
        return self._batched(network.probabilities, self.samples, f"{network.name} probabilities")

    def sample_features(self, network: FeatureNetwork, mode: str) -> Tensor:
        key = (network.name, network.sha256, mode)  # a network's pool and spatial features share a file
        if key not in self._features:
            self._features[key] = self.features(network, self.samples, mode)
        return self._features[key]

    def reference_statistics(self, network: FeatureNetwork, mode: str,
                             split: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu, sigma, n) of a real split's features, computed once (by one of concurrent
        evaluations; the others wait) and cached on disk."""
        key = {**self.data_key(split), "features": network.name, "sha256": network.sha256, "mode": mode}
        path = self.cache_dir / "reference_stats" / f"{digest(key)}.npz"
        with locked(path):
            return self._reference_statistics(network, mode, split, path, key)

    def _reference_statistics(self, network: FeatureNetwork, mode: str, split: str, path: Path,
                              key: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
        if path.exists():
            try:
                with np.load(path) as stats:
                    return stats["mu"], stats["sigma"], int(stats["n"])
            except Exception as exc:  # a damaged cache entry is recomputed
                warnings.warn(f"reference statistics {path} unreadable ({exc}); recomputing", stacklevel=2)
        images, _ = self.real(split)
        running = RunningStatistics()  # batch by batch: a split's features need not fit in memory
        for i in bar(range(0, len(images), FEATURE_BATCH), desc=f"{network.name} reference {split}",
                     unit="batch", leave=False, progress=self.progress):
            running.update(network.features(images[i:i + FEATURE_BATCH], mode=mode))
        mu, sigma = running.result()
        save_npz(path, mu=mu, sigma=sigma, n=np.array(len(images)),
                 key=np.array(json.dumps(key, sort_keys=True, default=str)))
        return mu, sigma, len(images)
