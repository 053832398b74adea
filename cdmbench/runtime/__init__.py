"""How a job runs: processes (torchrun), signals, devices and progress lines."""
