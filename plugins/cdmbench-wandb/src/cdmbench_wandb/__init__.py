"""cdmbench-wandb: Weights & Biases as a cdmbench logger (``log_to: [wandb]``)."""

__version__ = "0.1.0"
