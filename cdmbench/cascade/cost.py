"""What a cascade costs before it runs: parameters and FLOPs of each stage (``--dry-run``,
``validate`` and the MFU of ``bench``). A stage too large to build even on the meta device (sizes
whose element counts overflow, a schedule too long for memory) is an error naming the stage, not a
traceback."""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from cdmbench.cascade.stages import IMAGE_CHANNELS, StageModel, build_stage
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.plugins import Plugins
from cdmbench.recipe.components import recipe_classes
from cdmbench.recipe.schema import Recipe


def network_flops(stage: StageModel) -> tuple[int, int]:
    """FLOPs of the stage's network for one image: a forward pass, and a training pass (forward
    + backward, with the recomputation when gradient checkpointing is on). The stage is built on
    the meta device (``build_stage(..., device="meta")``): no memory, no time, and every
    attention backend counts as its matmuls (on a CPU, FlopCounterMode would count SDPA's fused
    kernel as 0)."""
    model = stage.backbone
    r = stage.spec.resolution
    x = torch.zeros(1, IMAGE_CHANNELS, r, r, device="meta")
    low = torch.zeros(1, IMAGE_CHANNELS, stage.low_res, stage.low_res, device="meta") if stage.low_res else None
    aug = torch.zeros(1, stage.augmentation.cond_dim, device="meta")
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    flops = []
    for train in (False, True):
        model.train(train)
        with FlopCounterMode(display=False) as counter:
            out = stage.forward(model, x, torch.zeros(1, device="meta"), labels, low, aug)
            if train:
                out.float().sum().backward()
        flops.append(counter.get_total_flops())
    return flops[0], flops[1]


def describe(recipe: Recipe, plugins: Plugins, echo=print) -> pd.DataFrame:
    """Build every stage on the meta device (no memory, no data): parameters, FLOPs of a forward
    pass and of a training pass (forward + backward, with the recomputation when gradient
    checkpointing is on) for one image, and the whole training run's FLOPs (training pass x
    batch x steps). The class count (class-embedding parameters)
    is known for Hub ids, else read from the dataset (``recipe_classes``)."""
    num_classes, source = recipe_classes(recipe.to_dict(), plugins)
    echo(f"class embeddings for {num_classes} classes ({source})")
    rows = []
    for stage in recipe.stages:
        st, flops = _measure(plugins, recipe, stage, num_classes)
        spec = st.spec.train
        rows.append(
            {
                "stage": st.spec.name,
                "resolution": st.spec.resolution,
                "condition_on": st.spec.condition_on or "-",
                "backbone": st.spec.backbone.name,
                "parameters": sum(p.numel() for p in st.backbone.parameters()),
                "GFLOP/forward": flops[0] / 1e9,
                "GFLOP/train image": flops[1] / 1e9,
                "T": "continuous" if st.process.continuous else st.process.T,
                "train steps": spec.steps,
                "batch": spec.batch_size,
                "train EFLOP": float(flops[1] * spec.batch_size * spec.steps) / 1e18,
            }
        )
    return pd.DataFrame(rows).set_index("stage")


def _measure(plugins: Plugins, recipe: Recipe, stage, num_classes: int) -> tuple[StageModel, tuple[int, int]]:
    """The stage built on the meta device and its FLOPs; sizes too large for torch's element counts
    or for memory (a schedule's tables are real tensors) are a ``RecipeError`` at the stage."""
    try:
        st = build_stage(plugins, recipe, stage, num_classes=num_classes, device="meta")
        return st, network_flops(st)
    except CdmbenchError:
        raise
    except (RuntimeError, OverflowError, MemoryError) as exc:
        raise RecipeError(f"stages.{stage.name}", "cannot build this stage to count its cost "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); its sizes (backbone "
                          "channels and depth, schedule timesteps) are too large: make them smaller") from None
