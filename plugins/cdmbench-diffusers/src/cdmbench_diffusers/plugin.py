"""The hooks cdmbench calls (entry point ``diffusers`` in the ``cdmbench`` group).

The components' modules (diffusers, torch) are imported inside the hooks, so that loading the
plugin for the command line (``cdmbench --help``) stays cheap."""

from cdmbench import hookimpl


@hookimpl
def cdmbench_register_backbones(register):
    from .backbone import diffusers_unet2d

    register("diffusers-unet2d", diffusers_unet2d,
             summary="diffusers UNet2DModel with adm-unet's arguments: class, low-res and "
                     "augmentation-level conditioning")


@hookimpl
def cdmbench_register_samplers(register):
    from .samplers import SCHEDULERS, any_scheduler, make

    for name, (scheduler, config, summary) in SCHEDULERS.items():
        register(name, make(scheduler, config), summary=summary)
    register("diffusers-scheduler", any_scheduler,
             summary="any diffusers scheduler by class name (args: scheduler, config)")
