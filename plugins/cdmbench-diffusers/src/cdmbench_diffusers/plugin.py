"""The hooks cdmbench calls (entry point ``diffusers`` in the ``cdmbench`` group)."""

from cdmbench import hookimpl

from .backbone import diffusers_unet2d
from .samplers import SCHEDULERS, any_scheduler, make


@hookimpl
def cdmbench_register_backbones(register):
    register("diffusers-unet2d", diffusers_unet2d,
             summary="diffusers UNet2DModel with adm-unet's arguments: class, low-res and "
                     "augmentation-level conditioning")


@hookimpl
def cdmbench_register_samplers(register):
    for name, (scheduler, config, summary) in SCHEDULERS.items():
        register(name, make(scheduler, config), summary=summary)
    register("diffusers-scheduler", any_scheduler,
             summary="any diffusers scheduler by class name (args: scheduler, config)")
