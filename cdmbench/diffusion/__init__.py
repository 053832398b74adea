"""The diffusion maths: processes and their schedules' grids, the prediction a network makes,
losses, per-image noise (``process``); where a grid puts its levels (``spacing``); an analytic
Gaussian mixture to test samplers on (``mixture``); and `cdmbench compare-samplers` (``compare``).

What a sampler plugin needs is importable from here: ``from cdmbench.diffusion import Grid,
Prediction, Denoise, randn_per_image``."""

from cdmbench.diffusion.process import (
                                        NOISE_COND_SCALE,
                                        ContinuousProcess,
                                        Denoise,
                                        DiscreteProcess,
                                        Grid,
                                        Prediction,
                                        Process,
                                        eps_from_x0,
                                        noise_level_cond,
                                        posterior,
                                        q_sample,
                                        randn_per_image,
                                        v_from,
                                        x0_eps_from_v,
                                        x0_from_eps,
)
from cdmbench.diffusion.spacing import Spacing

__all__ = ["NOISE_COND_SCALE", "ContinuousProcess", "Denoise", "DiscreteProcess", "Grid", "Prediction", "Process",
           "Spacing", "eps_from_x0", "noise_level_cond", "posterior", "q_sample", "randn_per_image", "v_from",
           "x0_eps_from_v", "x0_from_eps"]
