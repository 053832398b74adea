"""The hook cdmbench calls (entry point ``wandb`` in the ``cdmbench`` group).

The logger's module imports wandb only when a run opens the logger, so that loading the plugin
(``cdmbench --help``, ``cdmbench ls``) stays cheap; without wandb installed the name is not
available, with that reason."""

from cdmbench import hookimpl


@hookimpl
def cdmbench_register_loggers(register):
    from .logger import wandb_logger

    register("wandb", wandb_logger, requires=("wandb",),
             summary="Weights & Biases: losses, throughput, result rows, sample grids; resumes its run "
                     "(args: project, entity, mode, dir, group, tags)")
