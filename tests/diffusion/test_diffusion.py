"""Process math, schedules and losses against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from cdmbench.builtin.schedules import cosine, linear, log_snr
from cdmbench.diffusion import process as D
from cdmbench.diffusion.process import DiscreteProcess, Prediction


def process(timesteps: int = 100) -> DiscreteProcess:
    return DiscreteProcess(cosine(timesteps=timesteps).betas())


def test_cosine_abar_matches_iddpm_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731 (IDDPM eq. 17)
    diffusion = process(T)
    for t in (1, 10, 250, 500, 900):  # diffusion index t - 1 is DDPM's step t
        assert diffusion.abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert diffusion.betas.max().item() == pytest.approx(0.999)  # clipped at the end


def test_linear_betas_scaled_to_T():
    assert linear(timesteps=1000).betas()[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert linear(timesteps=250).betas()[[0, -1]].tolist() == pytest.approx([4e-4, 0.08])
    # The continuous abar(t) is the limit of the discrete product up to step t T.
    schedule = linear(timesteps=4000)
    discrete = torch.cumprod(1 - schedule.betas(), 0)
    for t in (0.1, 0.5):
        assert schedule.abar(torch.tensor(t)).item() == pytest.approx(
            discrete[round(t * 4000) - 1].item(), rel=3e-3)


def test_q_sample_moments():
    diffusion = process()
    abar = diffusion.abar[37].item()
    x0 = torch.full((200_000, 1), 0.6)
    x_t = D.q_sample(x0, abar, torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)))
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.6, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=1e-2)


@pytest.mark.parametrize("t", [1, 5, 60, 99])
def test_posterior_against_bayes_rule(t):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), evaluated on a fine grid."""
    diffusion = process()
    x0, x_t = 0.4, -0.3
    beta, abar_prev = diffusion.betas[t].item(), diffusion.abar[t - 1].item()
    grid = torch.linspace(-6, 6, 200_001, dtype=torch.float64)
    log_p = (-(x_t - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta)
             - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev)))
    w = torch.softmax(log_p, 0)
    mean = (w * grid).sum().item()
    var = (w * (grid - mean) ** 2).sum().item()
    got_mean, got_var = D.posterior(torch.tensor([[x0]], dtype=torch.float64),
                                    torch.tensor([[x_t]], dtype=torch.float64),
                                    diffusion.abar[t], diffusion.abar[t - 1])
    assert got_mean.item() == pytest.approx(mean, rel=1e-4, abs=1e-6)
    assert got_var.item() == pytest.approx(var, rel=1e-4)
    assert got_var.item() == pytest.approx(diffusion.posterior_var[t].item(), rel=1e-9)  # beta~_t


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, torch.randn(8, 3, 4, 4, generator=g)
    abar = process().abar[torch.arange(0, 80, 10)]
    x_t = D.q_sample(x0, abar, eps)
    output = {"eps": eps, "x0": x0, "v": D.v_from(x0, eps, abar)}[prediction]
    got_x0, got_eps = D.x0_eps(output, x_t, abar, prediction)
    assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)


def test_v_is_the_rotation_of_x0_and_eps():
    """v = d x_t / d phi for x_t = cos(phi) x_0 + sin(phi) eps (Salimans & Ho 2022)."""
    x0, eps, phi = torch.tensor([0.3]), torch.tensor([-1.2]), 0.7
    v = D.v_from(x0, eps, math.cos(phi) ** 2)
    assert v.item() == pytest.approx(-math.sin(phi) * 0.3 + math.cos(phi) * -1.2)


def test_respaced_grid_keeps_abar_at_kept_steps():
    diffusion = process(1000)
    grid = diffusion.grid(10)
    kept = torch.linspace(999, 0, 10).round().long()
    assert torch.allclose(grid.abar[:-1], diffusion.abar[kept], rtol=1e-12)
    assert grid.abar[-1].item() == 1.0  # ends on clean data
    assert grid.noise_cond.tolist() == pytest.approx(kept.double().tolist())  # 1000 t / T
    # The respaced betas are recomputed from abar: their product reproduces abar at kept steps.
    rebuilt = torch.cumprod(1 - grid.betas().flip(0), 0)  # increasing t
    assert torch.allclose(rebuilt, diffusion.abar[kept.flip(0)], rtol=1e-9)
    assert diffusion.grid().steps == 1000
    with pytest.raises(ValueError, match="choose 1..1000"):
        diffusion.grid(1001)


def test_grid_stopping_early():
    diffusion = process(100)
    grid = diffusion.grid(7, stop_at=0.25)  # s = 0.25 is step t = 24 (s = (t + 1) / T)
    assert grid.abar[-1].item() == diffusion.abar[24].item()
    assert grid.abar[-2].item() == diffusion.abar[25].item()
    assert grid.steps == 7
    assert diffusion.grid(stop_at=0.25).steps == 75
    with pytest.raises(ValueError, match="not a step of this 100-step process; use a multiple of 1/100"):
        diffusion.grid(10, stop_at=0.255)


def test_log_snr_schedule():
    schedule = log_snr(logsnr_min=-15.0, logsnr_max=12.0)
    assert schedule.timesteps is None
    ends = schedule.log_snr(torch.tensor([0.0, 1.0])).tolist()
    assert ends == pytest.approx([12.0, -15.0], rel=1e-9)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(schedule.abar(t), torch.sigmoid(schedule.log_snr(t)))
    assert bool((schedule.abar(t)[1:] < schedule.abar(t)[:-1]).all())  # decreasing in t
    # Continuous process: any number of steps, conditioned on the noise level, 500 - 25 lambda.
    grid = D.make_process(schedule).grid(7)
    assert grid.steps == 7 and grid.abar[-1].item() == 1.0
    lam = schedule.log_snr(torch.tensor([1 - i / 7 for i in range(7)], dtype=torch.float64))
    assert grid.noise_cond.tolist() == pytest.approx((500 - 25 * lam).tolist(), rel=1e-6)
    assert grid.noise_cond[0].item() == pytest.approx(500 + 25 * 15)
    stopped = D.make_process(schedule).grid(4, stop_at=0.3)
    assert stopped.abar[-1].item() == pytest.approx(schedule.abar(torch.tensor(0.3)).item())


def test_normal_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    lv1, lv2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(D.normal_kl(m1, lv1, m2, lv2), expected, atol=1e-5)


def test_discretized_likelihood_is_a_distribution_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, logvar in ((0.1, -3.0), (-0.95, -6.0), (0.99, -1.0)):
        p = D.discretized_gaussian_log_likelihood(bins, torch.tensor(mean, dtype=torch.float64),
                                                  torch.tensor(logvar, dtype=torch.float64)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    # an interior bin: Phi((x - m + 1/255) / s) - Phi((x - m - 1/255) / s)
    s = math.exp(-1.5)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    got = D.discretized_gaussian_log_likelihood(torch.tensor(0.2), torch.tensor(0.25), torch.tensor(-3.0))
    assert got.exp().item() == pytest.approx(
        phi((0.2 - 0.25 + 1 / 255) / s) - phi((0.2 - 0.25 - 1 / 255) / s), rel=1e-5
    )


def oracle(x0: Tensor, var_frac: float = 0.0):
    """A denoiser that knows x_0 (eps is exact) and returns a fixed variance interpolation."""
    def denoise(x_t, abar, noise_cond):
        return Prediction(x0, D.eps_from_x0(x_t, abar, x0), torch.full_like(x0, var_frac))
    return denoise


def test_vlb_with_the_true_posterior_equals_its_analytic_value():
    """With the true posterior mean and variance beta~, every KL term is 0 and the bound is the
    prior term plus the decoder's discretised likelihood of x_0 under N(x_0, beta~_2)."""
    diffusion = process(50)
    x0 = torch.tensor([-1.0, -0.2, 0.0, 0.6, 1.0], dtype=torch.float64).reshape(1, 5, 1, 1)
    bpd = diffusion.bits_per_dim(oracle(x0), x0, generator=torch.Generator().manual_seed(0),
                                 progress=False)
    abar_T = diffusion.abar[-1].item()
    prior = 0.5 * (abar_T * x0**2 + (1 - abar_T) - 1 - math.log(1 - abar_T))
    s = math.sqrt(diffusion.posterior_var[1].item())
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    interior = math.log(phi(1 / (255 * s)) - phi(-1 / (255 * s)))
    edge = math.log(phi(1 / (255 * s)))
    decoder = -torch.tensor([edge, interior, interior, interior, edge], dtype=torch.float64)
    expected = (prior.flatten().mean() + decoder.mean()) / math.log(2)
    assert bpd.item() == pytest.approx(expected.item(), rel=1e-6)


def test_vlb_kl_term_with_a_wrong_variance():
    """v = 1 (Sigma = beta_t) instead of beta~_t: the KL term is the closed-form KL of two
    Gaussians with equal means."""
    diffusion = process(50)
    x0 = torch.full((1, 3, 2, 2), 0.3, dtype=torch.float64)
    t = torch.tensor([20])
    x_t = D.q_sample(x0, diffusion.abar[t], torch.randn(x0.shape, dtype=torch.float64))
    term = diffusion.vlb_terms(x0, x_t, t, oracle(x0, 1.0)(x_t, diffusion.abar[t], None))
    ratio = diffusion.posterior_var[20].item() / diffusion.betas[20].item()
    assert term.item() == pytest.approx(0.5 * (ratio - 1 - math.log(ratio)) / math.log(2), rel=1e-6)


@pytest.mark.parametrize("loss", ["simple", "x0", "v", "hybrid"])
def test_losses_vanish_for_the_exact_prediction(loss):
    diffusion = process(50)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (4, 3, 2, 2), generator=g) / 127.5 - 1).double()
    eps, t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.tensor([1, 7, 30, 49])
    abar = diffusion.abar[t]
    x_t = D.q_sample(x0, abar, eps)
    target = {"simple": eps, "x0": x0, "v": D.v_from(x0, eps, abar), "hybrid": eps}[loss]
    output = torch.cat([target, torch.full_like(target, -1.0)], 1) if loss == "hybrid" else target
    got = D.training_loss(loss, output=output, x0=x0, eps=eps, x_t=x_t, t=t, abar=abar, process=diffusion)
    assert got.shape == (4,)
    assert torch.allclose(got.double(), torch.zeros(4, dtype=torch.float64), atol=1e-6)
    wrong = D.training_loss(loss, output=output + 0.1, x0=x0, eps=eps, x_t=x_t, t=t, abar=abar,
                            process=diffusion)
    assert bool((wrong > 1e-3).all())


def test_hybrid_loss_vlb_trains_only_the_variance():
    diffusion = process(50)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 2, 2, generator=g) * 2 - 1, torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 5, 20, 40])
    x_t = D.q_sample(x0, diffusion.abar[t], eps)
    output = torch.cat([eps + 0.3, torch.zeros_like(eps)], 1).requires_grad_(True)
    kwargs = dict(x0=x0, eps=eps, x_t=x_t, t=t, abar=diffusion.abar[t], process=diffusion)
    D.training_loss("hybrid", output=output, vlb_weight=1.0, **kwargs).sum().backward()
    hybrid_grad = output.grad.clone()
    output.grad = None
    D.training_loss("simple", output=output[:, :3], **kwargs).sum().backward()
    assert torch.allclose(hybrid_grad[:, :3], output.grad[:, :3])  # the mean sees only L_simple
    assert hybrid_grad[:, 3:].abs().sum() > 0  # the variance is trained by L_vlb


def test_linear_schedule_refuses_a_step_count_whose_last_beta_reaches_1():
    """beta_end x 1000 / T >= 1 makes abar_T = 0 (x_0 = x_T / sqrt(abar) is then infinite)."""
    from cdmbench.builtin.schedules import linear

    with pytest.raises(ValueError, match="use timesteps >= 21 or the cosine schedule"):
        linear(timesteps=20)
    assert linear(timesteps=21).betas()[-1] < 1


def test_non_finite_samples_are_an_error_not_black_pixels():
    from cdmbench.data.images import to_uint8
    from cdmbench.errors import CdmbenchError

    images = torch.zeros(3, 3, 4, 4)
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(CdmbenchError, match="1 of 3 sampled images hold NaN or infinite values"):
        to_uint8(images)
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
