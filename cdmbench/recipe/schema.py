"""The recipe schema: one dataclass per section, each key's type, default and meaning.

Every key's meaning is the docstring under its field (``REPLICATES_DOC`` for a stage's
``replicates``, which is not a field); ``docs/recipes.md`` is generated from them
(``python -m cdmbench.recipe.reference --write docs/recipes.md``). ``validate`` turns a raw YAML
mapping into these dataclasses.

Every number has a ``Bound`` (``bounded(...)``: the field's metadata), which its docstring states:
NaN, infinities and absurd values (a batch of 10^12 images, a 10^6-pixel side) are refused when
the recipe loads, naming the key, instead of failing or hanging later.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cdmbench.errors import RecipeError
from cdmbench.registry import suggestion

FORMAT_VERSION = 1
# Names that become one path component (a stage's folder, the run directory runs/<name>): no
# separator, not '.' or '..', not empty; match with ``fullmatch``.
STAGE_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def _number(value: float) -> str:
    """A bound as written in docstrings and messages: 1048576 as 2^20, 10^9, 2^63 - 1; 4096 as is."""
    if isinstance(value, int) and value >= 2**62:
        return f"2^{value.bit_length()} - 1" if value == 2**value.bit_length() - 1 else str(value)
    if isinstance(value, int) and value >= 10**6 and str(value).rstrip("0") == "1":
        return f"10^{len(str(value)) - 1}"
    if isinstance(value, int) and value >= 2**16 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


class Bound(NamedTuple):
    """The interval a number must lie in (finite), e.g. ``[1, 2^20]`` or ``(0, 1]``. (No dataclass: the
    dataclasses here are the recipe's sections.)"""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    @property
    def interval(self) -> str:
        return (f"{'(' if self.open_low else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.open_high else ']'}")

    def contains(self, value: float) -> bool:
        return (math.isfinite(value) and (self.low < value if self.open_low else self.low <= value)
                and (value < self.high if self.open_high else value <= self.high))

    def check(self, value: float, path: str) -> None:
        """A ``RecipeError`` at ``path`` unless ``value`` is a finite number in the interval."""
        if not self.contains(value):
            shown = repr(value) if len(repr(value)) <= 24 else f"{repr(value)[:12]}... ({len(repr(value))} digits)"
            finite = "" if math.isfinite(value) else "a finite number "
            raise RecipeError(path, f"must be {finite}in {self.interval}, got {shown}; set a value in that range")


def bounded(low: float, high: float, default: Any = dataclasses.MISSING, *, open_low: bool = False,
            open_high: bool = False) -> Any:
    """A numeric field that ``validate`` checks against ``Bound(low, high, ...)``."""
    return field(default=default, metadata={"bound": Bound(low, high, open_low, open_high)})


MAX_STEPS = 10**9  # steps of any kind (training, warm-up, between checkpoints or log rows)
MAX_BATCH = 2**20  # images per batch: a step's global batch, sampling and evaluation batches
MAX_SEED = 2**63 - 1
REPLICATES = Bound(1, 100)  # a stage's `replicates` (not a field)
SIGMA_BOUND = Bound(0, 10**6, open_low=True)  # a noise level sigma named in a recipe
MAX_SIGMA_REL = math.sqrt(1 / 12)  # a post-hoc EMA's length: gamma = 0, the plain average of all steps


@dataclass
class Component:
    """A component of some kind (dataset, backbone, schedule, sampler, augmentation, metric, logger):
    its registered name and the keyword arguments of its factory. A bare name (``ddpm``) stands for
    ``{name: ddpm}``."""

    name: str
    """The registered name (``cdmbench ls KIND`` lists them); an unknown name is refused, naming the nearest
    valid one (or all of them)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The factory's keyword arguments, checked when the recipe loads: each must be a parameter of the
    factory (unless it takes ``**kwargs``) and is converted to its type hint; keyword-only parameters without
    a default are required; host facts (what cdmbench passes itself, ``cdmbench.interfaces.HOST_ARGS``)
    are refused."""


@dataclass
class PosthocEma:
    """Post-hoc EMA (Karras et al. 2024, EDM2 section 3): power-function EMAs of the weights kept while
    training and stored as snapshots, from which ``cdmbench ema`` reconstructs an EMA of any length after
    training. The classic EMA (``train.ema``) is kept beside them."""

    sigma_rels: list[float] = field(default_factory=list)
    """The lengths of the stored EMAs, as sigma_rel (the standard deviation of an EMA's weights over the
    steps, over the step count); EDM2 stores [0.05, 0.10]. Each in (0, 0.2887) (0.2887: the plain average
    of all steps), all different; empty: off. Lengths between and near them reconstruct best."""
    snapshot_every: int = bounded(1, MAX_STEPS, 1000)
    """Steps between snapshots of the stored EMAs (one is also written at the last step), each a folder
    ``<stage>/posthoc_ema/snapshot-<step>/``; more snapshots reconstruct more exactly (40 over 4000 steps:
    within 0.1 % of the target EMA's weighting of the steps). In [1, 10^9], at most ``steps``."""


@dataclass
class Train:
    """How a stage trains: AdamW on batches of the dataset's training split, an exponential moving average
    (EMA) of the weights, checkpoints and a training log."""

    steps: int = bounded(1, MAX_STEPS)
    """Optimizer steps to train, each on one global batch; in [1, 10^9]. Raise it and run the recipe again to train
    on from the latest checkpoint; a checkpoint beyond it is refused."""
    batch_size: int = bounded(1, MAX_BATCH)
    """The global batch in images per step, over all processes and micro-batches; in [1, 2^20]. It must be divisible
    by ``grad_accumulation``, and under torchrun by the number of processes x ``grad_accumulation``."""
    lr: float = bounded(0.0, 1.0, 1.0e-4, open_low=True)
    """AdamW's learning rate, constant after the warm-up; in (0, 1]."""
    weight_decay: float = bounded(0.0, 10.0, 0.0)
    """AdamW's decoupled weight decay (0: none); in [0, 10]."""
    ema: float = bounded(0.0, 1.0, 0.9999, open_high=True)
    """Decay d of the EMA of the weights, updated after every step (ema <- d ema + (1 - d) weights); sampling
    and evaluation use the EMA weights. In [0, 1); it averages over about 1 / (1 - d) steps."""
    checkpoint_every: int = bounded(1, MAX_STEPS, 1000)
    """Steps between checkpoints (weights, EMA, optimizer state); one is also written at the last step and
    when SIGTERM or Ctrl-C stops training. In [1, 10^9]."""
    keep_checkpoints: int = bounded(1, 10**4, 3)
    """How many of the newest checkpoints are kept: older ones are deleted, except milestones. In
    [1, 10000]."""
    milestone_every: int = bounded(0, MAX_STEPS, 0)
    """Checkpoints whose step is a multiple of this are never deleted (0: none). Only steps that are
    checkpointed count: use a multiple of ``checkpoint_every``. In [0, 10^9]."""
    log_every: int = bounded(1, MAX_STEPS, 100)
    """Steps between rows of ``train_log.jsonl`` (mean loss, gradient norm and images/s since the previous
    row, training seconds); a row is also written at each checkpoint. A NaN or infinite loss or gradient
    norm stops training at the next row. In [1, 10^9]."""
    val_bpd_images: int = bounded(0, 10**7, 0)
    """After training, the variational bound in bits/dim on the first N images of the test split, as a
    ``val_bpd`` result row (0: none). Needs ``loss: hybrid`` (the learned variance); in [0, 10^7]."""
    eval_every: int = bounded(0, MAX_STEPS, 0)
    """Every N steps, and at the last step, evaluate the stage's EMA weights with ``evaluate.metrics`` on
    ``eval_num_samples`` samples (a base stage's own; an SR stage's from ground-truth low-res inputs,
    downsampled training images augmented at its sampling level) and record the rows, with the step and
    the training images seen, in results.jsonl (``cdmbench.reporting.curves`` plots them). 0: off. In [0, 10^9], at most
    ``steps``; needs ``evaluate.metrics``. Training reaches the same weights with it as without."""
    eval_num_samples: int = bounded(1, 10**8, 1000)
    """Class-balanced samples of each evaluation during training (``eval_every``); in [1, 10^8]."""
    posthoc_ema: PosthocEma = field(default_factory=PosthocEma)
    """Post-hoc EMA: the keys of ``stages[].train.posthoc_ema``."""
    warmup_steps: int = bounded(0, MAX_STEPS, 0)
    """Steps of linear learning-rate warm-up: step k (from 0) uses lr x min(1, (k + 1) / warmup_steps);
    0: none. In [0, 10^9]."""
    grad_clip: float = bounded(0.0, 10**6, 0.0)
    """Maximum global gradient norm: larger gradients are scaled down to it (0: no clipping); in
    [0, 10^6]."""
    grad_accumulation: int = bounded(1, MAX_BATCH, 1)
    """Micro-batches per step: each process's share of ``batch_size`` runs forward and backward in this many
    parts (less memory, the same step); in [1, 2^20] and divides ``batch_size``."""
    flip: bool = True
    """Random horizontal flips of training images (the same for x_0 and its low-res input), each with
    probability 1/2; false: never (CDM flips only its 32x32 base and 64->256 stages). The flip draws are made
    either way, so the other draws of training stay the same."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (forward pass and loss under bfloat16 autocast; weights and optimizer stay in
    float32); other values are refused. Also the sampling precision while ``sample.precision`` is
    ``train``."""
    channels_last: bool = False
    """Convert the network to the channels-last (NHWC) memory format, a speed setting for convolutions on
    GPUs."""
    compile: bool = False
    """``torch.compile`` the network for training (after wrapping it for DDP); sampling runs it
    uncompiled."""
    cudnn_benchmark: bool = True
    """Set ``torch.backends.cudnn.benchmark``: cuDNN times its convolution algorithms for the fixed training
    shapes and keeps the fastest; false: cuDNN's heuristics."""
    gradient_checkpointing: bool = False
    """The backbone recomputes its blocks' activations in backward: less memory for about a third more
    compute, the same gradients. Refused, when the stage is built, for a backbone without
    ``set_gradient_checkpointing`` (``adm-unet`` has it)."""


@dataclass
class Guidance:
    """Classifier-free guidance (Ho & Salimans 2021): train with labels dropped (replaced by a
    null class) with probability ``label_dropout``; sample with eps_u + scale (eps_c - eps_u)."""

    label_dropout: float = bounded(0.0, 1.0, 0.0, open_high=True)
    """Probability that a training example's class label is replaced by an extra null class (the last
    label), which trains the unconditional model that guidance needs; 0: no null class. In [0, 1)."""
    scale: float = bounded(0.0, 100.0, 1.0)
    """Guidance weight w when sampling: the network's prediction is uncond + w (cond - uncond), two passes
    per sampling step (the learned variance, if any, stays the conditional one); 1: the conditional model
    alone, one pass. In [0, 100]; a value other than 1 needs ``label_dropout`` > 0, or a guide network
    (``guide_step``, ``guide_stage``)."""
    guide_step: int | None = bounded(1, MAX_STEPS, None)
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): guide
    with this stage's EMA at an earlier checkpoint step (keep it: ``train.milestone_every``) in place of
    the unconditional model: the prediction is weak + scale (cond - weak), both conditional, two passes.
    In [1, 10^9], below ``train.steps``; null: none."""
    guide_stage: str | None = None
    """Autoguidance with another stage of the recipe as the weaker model (e.g. a smaller network trained
    on the same data): it has this stage's resolution, ``condition_on``, loss, schedule and augmentation.
    null: none; at most one of ``guide_step`` and ``guide_stage``."""
    interval: tuple[float, float] | None = None
    """``[low, high]``: guide only at noise levels sigma = sqrt((1 - abar) / abar) in (low, high]
    (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"); at the other levels the
    conditional model alone, one pass. Sigma means the same on any schedule; in log-SNR
    lambda = -2 log(sigma) the interval is [-2 log(high), -2 log(low)). null: every level. Both in
    (0, 10^6], low < high; needs a ``scale`` other than 1."""


@dataclass
class Stage:
    """One diffusion model of the cascade: a base stage generates images from class labels; a
    super-resolution (SR) stage also gets an earlier stage's images (``condition_on``), augmented."""

    name: str
    """The stage's name: lower-case letters, digits, ``-`` and ``_``, starting with a letter, at most 64
    characters; unique. It names the stage's folder in the run directory and the stage in ``--stage NAME`` and
    ``--set stages.NAME.KEY=VALUE``."""
    resolution: int = bounded(4, 4096)
    """Side in pixels of the square images the stage generates; in [4, 4096], and an SR stage's must exceed
    that of the stage it conditions on."""
    backbone: Component
    """The denoising network: a ``backbones`` component (``adm-unet``; ``diffusers-unet2d`` with the
    cdmbench-diffusers plugin)."""
    schedule: Component
    """The noise schedule: a ``schedules`` component: ``linear`` or ``cosine`` (discrete: ``timesteps``
    steps) or ``log-snr`` (continuous)."""
    train: Train
    """How the stage trains: the keys of ``stages[].train``."""
    sampler: Component
    """The sampler: a ``samplers`` component (``ddpm``, ``ddim``, ``dpm-solver-2m``), checked against the
    schedule and loss when the stage is built (e.g. ``loss: hybrid`` with ``ddpm`` needs
    ``variance: learned``; no more steps than a discrete schedule has)."""
    loss: str = "simple"
    """What the network predicts and its loss: ``simple`` (MSE of the noise eps, DDPM), ``x0`` (MSE of the
    clean image), ``v`` (MSE of v = sqrt(abar) eps - sqrt(1 - abar) x0) or ``hybrid`` (``simple`` +
    ``vlb_weight`` x L_vlb with a learned variance, Improved DDPM; the network outputs twice the channels;
    needs a discrete schedule). Other values are refused."""
    vlb_weight: float = bounded(0.0, 1000.0, 0.001)
    """Lambda of the hybrid loss L_simple + lambda L_vlb (only ``loss: hybrid`` uses it); in [0, 1000]."""
    guidance: Guidance = field(default_factory=Guidance)
    """Classifier-free guidance: the keys of ``stages[].guidance``."""
    posthoc_sigma_rel: float | None = None
    """Sample and evaluate with the post-hoc EMA of this length (sigma_rel; ``train.posthoc_ema``),
    reconstructed from the stage's snapshots at the checkpoint's step by ``cdmbench ema`` or on first
    use, instead of the checkpoint's EMA (``train.ema``); null: the checkpoint's EMA. In (0, 0.2887)."""
    condition_on: str | None = None
    """The name of an earlier stage whose samples this SR stage upsamples (its low-res input, augmented);
    null: a base stage, generated from class labels alone."""
    augmentation: Component | list[Component] = field(default_factory=lambda: Component("none"))
    """Conditioning augmentation of the low-res input: an ``augmentations`` component (``none``,
    ``gaussian``, ``blur``), or a list of them applied in order (their conditioning vectors concatenate).
    Anything but ``none`` needs ``condition_on``."""
    replicate_of: str | None = None
    """Set by cdmbench, not by hand: on each copy that ``replicates: k`` appends, the name of the stage it
    copies (run.yaml shows it). A name that is not an earlier stage, or that is itself a copy, is
    refused."""

    def augmentations(self) -> list[Component]:
        return self.augmentation if isinstance(self.augmentation, list) else [self.augmentation]


@dataclass
class Sample:
    """How the cascade is sampled: by ``cdmbench run`` after training (a grid per stage), and the
    defaults of ``cdmbench sample``."""

    images_per_class: int = bounded(1, 10**6, 8)
    """Images per class that ``cdmbench run`` samples for each stage's grid (one row per class); the
    default of ``cdmbench sample --per-class``. In [1, 10^6]."""
    batch_size: int = bounded(1, MAX_BATCH, 64)
    """Images per sampling batch (``cdmbench run``, ``cdmbench sample``, the sampling part of
    ``cdmbench bench``); the images do not depend on it. In [1, 2^20]."""
    seed: int = bounded(0, MAX_SEED, 0)
    """Seed of all sampling: image i of a stage draws from (seed, stage position, i), so a request gives the
    same images in any batch size; evaluation and sweeps use it too. In [0, 2^63 - 1]."""
    num_classes: int | None = bounded(1, 10**6, None)
    """Sample (and grid) only the first N classes; null: every class. Also the default classes of
    ``cdmbench sample``; evaluation samples every class. In [1, 10^6] or null."""
    precision: str = "train"
    """The networks' precision when sampling (run, sample, evaluate, sweep): ``train`` (each stage's
    ``train.precision``), ``fp32`` or ``bf16`` (the network under bfloat16 autocast; the sampler's arithmetic
    stays float32). Other values are refused."""


# The keys a sampling-time search (``evaluate.search.space``) may set: how trained weights are
# sampled, never how they were trained.
SEARCH_KEY_RE = re.compile(r"stages\.[^.]+\.(sampler(\..+)?|guidance\.(scale|interval|guide_step|guide_stage)"
                           r"|posthoc_sigma_rel|augmentation(\.[^.]+)?\.args\.level)|sample\.precision")
SEARCH_STRATEGIES = ("grid", "coordinate")
MAX_SEARCH_POINTS = 10**4  # a grid's points, each sampled and evaluated


@dataclass
class Search:
    """A sampling-time search (CDM's of the level s, EDM2's of the EMA length, guidance, sampler steps) that
    ``cdmbench evaluate`` runs before evaluating (``--no-search`` skips it): each point evaluated on
    ``num_samples`` samples, the best by ``metric`` kept in ``<run>/search.json`` and then evaluated on
    ``evaluate.num_samples``. Later ``evaluate`` and ``sample`` apply the chosen point (``--set`` wins)."""

    space: dict[str, list[Any]] = field(default_factory=dict)
    """Sampling-time keys in ``--set`` dotted form, each with its candidate values, e.g.
    ``stages.sr64.augmentation.args.level: [0.0, 0.1, 0.2]``: a stage's ``sampler`` (``sampler.name``,
    ``sampler.args.*``), ``guidance.scale``, ``.interval``, ``.guide_step``, ``.guide_stage``,
    ``posthoc_sigma_rel``, ``augmentation.args.level`` (``augmentation.<name>.args.level`` in a list), and
    ``sample.precision``. Training keys (``train``, ``backbone``, ``schedule``, ``loss``, ...) are refused:
    they need another training run. Empty: no search."""
    metric: str | None = None
    """The result row to optimise, e.g. ``fid_train``; its row's ``higher_is_better`` gives the direction.
    Required with a ``space``."""
    strategy: str = "grid"
    """``grid``: every point of the joint Cartesian product of the keys, over all stages (at most 10^4);
    ``coordinate``: from the first candidate of every key, one key at a time in the declared order, each
    set to its best candidate with the others kept, for spaces too large to grid."""
    num_samples: int = bounded(1, 10**8, 10000)
    """Samples per point: the first of the full evaluation's, so the chosen point's are not sampled
    again. In [1, 10^8]."""
    metrics: list[str] = field(default_factory=list)
    """Names of ``evaluate.metrics`` computed at each point (e.g. ``[fid, is]`` for the trade-off plots);
    empty: all of them but a CAS that replaces the training set. ``metric`` must be one of their rows."""


@dataclass
class Evaluate:
    """What ``cdmbench evaluate`` (and ``sweep``, ``prepare --metrics``) does by default."""

    metrics: list[Component] = field(default_factory=list)
    """The metrics: ``metrics`` components (``fid``, ``sfid``, ``precision-recall``, ``is``, ``cas``),
    each a bare name or ``{name, args}``. ``--metrics fid,is`` picks some by name, with their args
    from here (the last entry of that name; a name not listed: default args)."""
    num_samples: int = bounded(1, 10**8, 50000)
    """Samples to generate and evaluate, of classes drawn as ``labels`` says; the default of
    ``--num-samples``. In [1, 10^8]."""
    labels: str = "random"
    """How evaluation samples' classes are drawn (also a sweep's and those during training): ``random``
    (uniform and independent, as ADM's and EDM's published numbers: image i's class derives from
    ``sample.seed`` and i only, the same at any batch size and number of processes) or ``balanced``
    (image i has class i mod the class count; raises IS at ImageNet scale). Recorded in every row's
    protocol; published rows are comparable only under the same. Other values are refused."""
    batch_size: int = bounded(1, MAX_BATCH, 64)
    """Images per sampling batch of evaluation and sweeps. In [1, 2^20]."""
    shard_size: int = bounded(1, 10**7, 1000)
    """Samples per npz shard, the unit in which evaluation's sampling resumes. In [1, 10^7]."""
    stage: str | None = None
    """The stage whose samples are evaluated by default (``--stage`` overrides); null: the last stage. It
    must name a stage."""
    search: Search = field(default_factory=Search)
    """A sampling-time search run before the evaluation: the keys of ``evaluate.search``."""


@dataclass
class Launch:
    """How ``cdmbench launch`` submits the recipe's jobs (``docs/cluster.md``): each key not given here
    comes from the command line's option, else the user's ``~/.config/cdmbench/launch.yaml`` (the same keys;
    ``$CDMBENCH_LAUNCH_CONFIG`` names another file), else the default stated. Changing them never makes a
    trained run a different recipe."""

    cluster: str | None = None
    """``slurm`` (sbatch through submitit) or ``local`` (the jobs as processes of this machine, one after
    another where one waits on another); null: ``slurm``. Other values are refused."""
    partition: str | None = None
    """The SLURM partition; null: the cluster's default."""
    account: str | None = None
    """The SLURM account to charge; null: the user's default."""
    qos: str | None = None
    """The SLURM quality of service; null: the default."""
    time: str | None = None
    """Time limit of each job, ``MINUTES``, ``HH:MM:SS`` or ``D-HH:MM:SS``; a stage that needs longer
    checkpoints before the limit and requeues itself. Null: ``24:00:00``."""
    nodes: int | None = bounded(1, 10**4, None)
    """Nodes of each training job; null: 1. In [1, 10000]."""
    gpus_per_node: int | None = bounded(0, 64, None)
    """GPUs per node of each training job, one process each (0: one process on the CPU); null: 1. In
    [0, 64]. Sampling and evaluation jobs take one GPU per job or array element."""
    cpus_per_task: int | None = bounded(1, 1024, None)
    """CPU cores per process; null: the cluster's default. In [1, 1024]."""
    setup: list[str] | None = None
    """Shell lines each job runs first (e.g. ``module load cuda``, ``source .venv/bin/activate``); null:
    none."""
    sbatch: dict[str, Any] | None = None
    """Further sbatch options, e.g. ``{constraint: a100, mem: 0, exclude: node12}`` (``true``: a bare
    flag); null: none."""
    signal: str | None = None
    """The signal SLURM sends ``grace_s`` before the time limit (``--signal``) and on preemption where the
    cluster sends it (``PreemptParameters=send_user_signal``): the stage finishes its step, checkpoints
    and the job requeues itself. ``USR1``, ``USR2``, ...; null: ``USR2``. SIGTERM (``scancel``, a
    preemption without it) saves and stops without requeueing."""
    grace_s: int | None = bounded(10, 86400, None)
    """Seconds between the signal and the time limit: the step in flight, the checkpoint and the requeue
    must fit (the quickstart's checkpoint takes well under a second, an ImageNet stage's tens of seconds
    on a network file system). Null: 300. In [10, 86400]."""
    max_requeues: int | None = bounded(0, 10**4, None)
    """How many times a job may requeue itself at its time limit (preemptions do not count); null: 100.
    In [0, 10000]."""
    eval_array: int | None = bounded(1, 10**4, None)
    """Array elements of ``cdmbench launch RUN --evaluate``: element i of W generates the evaluation
    sample shards k with k mod W = i (and those of CAS's generated training set); null: 8. In [1, 10000]."""


@dataclass
class Recipe:
    """A cascade on one dataset: how its stages train, how it samples and what evaluation computes."""

    cdmbench: int
    """The recipe format version: 1, the format this cdmbench reads; other values are refused."""
    name: str
    """The run's name: the default run directory is ``runs/<name>`` (``--out`` changes it) and every
    result row's ``run``. One path component: letters, digits, ``.``, ``_``, ``+`` and ``-``, starting with a
    letter or digit, at most 128 characters (no ``/``, not ``..``). ``--smoke`` appends ``-smoke``."""
    data: Component
    """The dataset: a ``datasets`` component (``shapes``, ``fashion-mnist``, ``imagefolder``, ``hf``).
    Every stage trains on its training split at the stage's resolution; evaluation compares samples with
    its splits."""
    stages: list[Stage]
    """The cascade, a non-empty list: base stages (no ``condition_on``) and SR stages, each conditioned on
    an earlier one. A stage's seeds derive from its position: stages may be appended to a trained run,
    not reordered. The keys of ``stages[]``."""
    seed: int = bounded(0, MAX_SEED, 0)
    """Seed of training: each stage's initial weights, batch order and every step's draws (flips, noise
    levels, noise, augmentation, label dropout) derive from it and the stage's position. In [0, 2^63 - 1].
    Sampling uses ``sample.seed``."""
    device: str = "auto"
    """``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; other values are
    refused. Under torchrun ``auto`` and ``cuda`` mean the process's GPU (``LOCAL_RANK``)."""
    plugins: list[str] = field(default_factory=list)
    """Plugin modules to import by module name (e.g. one under development), besides the built-ins and
    the installed plugins (``cdmbench`` entry points)."""
    sample: Sample = field(default_factory=Sample)
    """How the cascade is sampled: the keys of ``sample``."""
    evaluate: Evaluate = field(default_factory=Evaluate)
    """What evaluation computes by default: the keys of ``evaluate``."""
    launch: Launch = field(default_factory=Launch)
    """How ``cdmbench launch`` submits the jobs (SLURM or local): the keys of ``launch``."""
    log_to: list[Component] = field(default_factory=list)
    """Experiment trackers that the run also logs to: ``loggers`` components, each a bare name or ``{name,
    args}``, each at most once (``tensorboard``: event files in ``<stage>/tensorboard/``, needs the
    tensorboard package; ``wandb`` with the cdmbench-wandb plugin). They get each training log row, the
    result rows as results.jsonl gets them and the sample grids; ``cdmbench evaluate`` and ``sweep`` log
    their rows to the same tracker runs. Only the main process of a torchrun job logs. Empty: none (the
    run directory has everything)."""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError("stages", f"no stage '{name}'; {suggestion(name, self.stage_names())}")

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def replicates(self) -> dict[str, list[str]]:
        """Each stage that is not a copy: its name, then its copies' (``replicates: k``)."""
        groups = {s.name: [s.name] for s in self.stages if s.replicate_of is None}
        for s in self.stages:
            if s.replicate_of is not None:
                groups[s.replicate_of].append(s.name)
        return groups

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- generic strict conversion of plain YAML data into the dataclasses above ---------------


REPLICATES_DOC = """Train the stage k times (k in [1, 100]): copies named ``<name>_r2`` .. ``<name>_rk``, with
``replicate_of: <name>``, are appended after all stages, so that the others keep their positions, from which
seeds derive (each copy trains with its own; adding copies to a trained run trains only them). CDM's
findings judge the stage by the mean of its k runs and their spread, and report.md gives each metric's mean
and standard error. Not in the resolved recipe (run.yaml), which lists the copies."""


# --- overrides ------------------------------------------------------------------------------


# --- semantic checks ---------------------------------------------------------------------


