"""Training: the trainer, checkpoints, the `run` command and `bench`."""
