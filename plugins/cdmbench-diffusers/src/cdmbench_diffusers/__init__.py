"""cdmbench-diffusers: diffusers' UNet2DModel and schedulers as cdmbench components."""

__version__ = "0.1.0"
