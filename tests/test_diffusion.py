"""The diffusion process agrees numerically with diffusers' schedulers and with IDDPM's closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from models.diffusion import (
    classifier_free_guidance,
    create_diffusion,
    ddim,
    ddim_timesteps,
    dpm_solver,
    dpm_solver_timesteps,
    guide,
    sample,
    space_timesteps,
)

N, C, H, W = 2, 4, 4, 4
# PixArt-alpha's training schedule (IDDPM linear betas), spelled out for every diffusers scheduler.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def denoiser(learn_sigma: bool = False, seed: int = 0):
    """A fixed, cheap, deterministic stand-in for a trained network.

    eps = sqrt(1 - alpha-bar_t) (x + 0.2 mix(x)) + 0.1 sin(t / 300) b is what an optimal denoiser of standard
    normal data predicts (sqrt(1 - alpha-bar_t) x), perturbed by a random channel mix and t-dependent bias;
    it keeps trajectories O(1), so tolerances mean the same at every step. With learn_sigma, a (N, 2C, H, W)
    output whose second half is a variance interpolation value in [-1, 1].
    """
    g = torch.Generator().manual_seed(seed)
    mix, var_mix = torch.randn(C, C, generator=g), torch.randn(C, C, generator=g)
    bias = torch.randn(C, generator=g)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        sigma = (1 - alphas_cumprod[t]).sqrt().to(x.dtype)[:, None, None, None]  # (N, 1, 1, 1)
        wave = torch.sin(t.to(x.dtype) / 300.0)[:, None, None, None]
        eps = sigma * (x + 0.2 * torch.einsum("oc,nchw->nohw", mix, x)) + 0.1 * wave * bias[:, None, None]
        if not learn_sigma:
            return eps
        return torch.cat([eps, torch.tanh(torch.einsum("oc,nchw->nohw", var_mix, x) + wave)], dim=1)

    return model


def noise(seed: int = 1, shape=(N, C, H, W)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, model, x: torch.Tensor, steps: int, **step_kwargs) -> list[torch.Tensor]:
    """The step loop of diffusers' pipelines, keeping every intermediate x."""
    scheduler.set_timesteps(steps)
    trajectory = []
    for t in scheduler.timesteps:
        eps = model(x, t.expand(x.shape[0]))[:, :C]
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        trajectory.append(x)
    return trajectory


# ---------------------------------------------------------------------------------------------------
#                                     Forward process and loss
# ---------------------------------------------------------------------------------------------------


def test_q_sample_matches_diffusers_add_noise():
    x_start, eps = noise(1), noise(2)
    for t in (torch.tensor([0, 999]), torch.tensor([1, 500]), torch.tensor([250, 998])):
        ours = create_diffusion().q_sample(x_start, t, eps)
        theirs = DDPMScheduler(**SCHEDULE).add_noise(x_start, eps, t)
        # diffusers accumulates alpha-bar in float32, IDDPM (and we) in float64: ~1e-6 apart.
        torch.testing.assert_close(ours, theirs, atol=5e-6, rtol=0)


def test_v_prediction_target_is_diffusers_velocity_and_inverts_exactly():
    """v = alpha eps - sigma x_0 (diffusers' get_velocity); a perfect v model has zero loss and recovers x_0."""
    x_start, eps, t = noise(1), noise(2), torch.tensor([0, 999])
    diffusion = create_diffusion(learn_sigma=False, prediction_type="v_prediction")
    v = DDPMScheduler(**SCHEDULE).get_velocity(x_start, eps, t)
    perfect = lambda x, t_: v  # noqa: E731 - the velocity of exactly this (x_start, eps, t)
    assert diffusion.training_losses(perfect, x_start, t, noise=eps)["mse"].abs().max() < 1e-9
    x_t = diffusion.q_sample(x_start, t, eps)
    out = diffusion.p_mean_variance_from_output(v, x_t, t)
    torch.testing.assert_close(out["pred_xstart"], x_start, atol=5e-5, rtol=0)
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        create_diffusion(prediction_type="x0")


def test_hybrid_loss_is_zero_kl_for_the_true_posterior():
    diffusion = create_diffusion()
    x_start = noise(1, (4, C, H, W)).double().clamp(-1, 1)
    eps = noise(2, (4, C, H, W)).double()
    t = torch.tensor([1, 10, 500, 999])
    # eps exact, and v = -1 selects log beta-tilde_t: the model's p(x_{t-1} | x_t) is q's posterior.
    true_posterior = lambda x, t: torch.cat([eps, -torch.ones_like(eps)], dim=1)
    losses = diffusion.training_losses(true_posterior, x_start, t, noise=eps)
    assert set(losses) == {"loss", "mse", "vb"} and losses["vb"].shape == (4,)
    assert torch.all(losses["mse"] == 0)
    torch.testing.assert_close(losses["vb"], torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)

    # The same mean with the wrong variance (v = +1: beta_t) has a positive KL (tiny at large t, where
    # beta_t and beta-tilde_t nearly agree).
    too_wide = lambda x, t: torch.cat([eps, torch.ones_like(eps)], dim=1)
    assert torch.all(diffusion.training_losses(too_wide, x_start, t, noise=eps)["vb"] > 0)


def test_vb_at_t0_is_the_discretized_gaussian_nll():
    diffusion = create_diffusion()
    x_start = (noise(1).clamp(-1, 1) * 127.5).round() / 127.5  # 8-bit data in [-1, 1]
    eps = noise(2)
    model = lambda x, t: torch.cat([eps, torch.zeros_like(eps)], dim=1)
    vb = diffusion.training_losses(model, x_start, torch.zeros(N, dtype=torch.long), noise=eps)["vb"]
    assert torch.all(torch.isfinite(vb)) and torch.all(vb > 0)


def test_vb_trains_only_the_variance():
    eps_param = torch.zeros((), requires_grad=True)
    var_param = torch.zeros((), requires_grad=True)
    model = lambda x, t: torch.cat([x * 0 + eps_param, x * 0 + var_param], dim=1)
    losses = create_diffusion().training_losses(model, noise(1), torch.tensor([3, 700]), noise=noise(2))
    losses["vb"].sum().backward()
    assert eps_param.grad == 0 and var_param.grad != 0


# ---------------------------------------------------------------------------------------------------
#                                             Samplers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "prediction_type"), [(20, "epsilon"), (10, "epsilon"), (25, "epsilon"), (20, "v_prediction")]
)
def test_dpm_solver_matches_diffusers_trajectory(steps: int, prediction_type: str):
    model = denoiser(learn_sigma=True)  # a learned-sigma model: the solvers use the prediction half
    scheduler = DPMSolverMultistepScheduler(
        **SCHEDULE,
        prediction_type=prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
    )
    theirs = run_diffusers(scheduler, model, noise(), steps)
    assert dpm_solver_timesteps(steps).tolist() == scheduler.timesteps.tolist()

    ours = list(dpm_solver(model, noise(), create_diffusion().alphas_cumprod, steps, prediction_type=prediction_type))
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {i}")


@pytest.mark.parametrize(
    ("steps", "eta", "prediction_type"),
    [(25, 0.0, "epsilon"), (20, 0.0, "epsilon"), (10, 1.0, "epsilon"), (20, 0.0, "v_prediction")],
)
def test_ddim_matches_diffusers_trajectory(steps: int, eta: float, prediction_type: str):
    model = denoiser()
    # Our defaults, spelled out: diffusers' own default clip_sample=True clamps x_0 to [-1, 1].
    scheduler = DDIMScheduler(
        **SCHEDULE,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    theirs = run_diffusers(scheduler, model, noise(), steps, eta=eta, generator=torch.Generator().manual_seed(7))
    assert ddim_timesteps(steps).tolist() == scheduler.timesteps.tolist()

    trajectory = ddim(
        model, noise(), create_diffusion().alphas_cumprod, steps, eta, generator=torch.Generator().manual_seed(7),
        prediction_type=prediction_type,
    )  # fmt: skip
    for i, (a, b) in enumerate(zip(trajectory, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {i}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_iddpm_ancestral_matches_diffusers_ddpm_learned_range(prediction_type: str):
    model = denoiser(learn_sigma=True)
    diffusion = create_diffusion("10", prediction_type=prediction_type)
    ours = list(diffusion.p_sample_loop_progressive(model, noise(), generator=torch.Generator().manual_seed(3)))

    # diffusers' DDPM over the same kept timesteps is the same respaced process.
    scheduler = DDPMScheduler(
        **SCHEDULE, variance_type="learned_range", clip_sample=False, prediction_type=prediction_type
    )
    scheduler.set_timesteps(timesteps=space_timesteps(1000, "10")[::-1])
    x, generator = noise(), torch.Generator().manual_seed(3)
    for t, a in zip(scheduler.timesteps, ours, strict=True):
        x = scheduler.step(model(x, t.expand(N)), t, x, generator=generator).prev_sample
        torch.testing.assert_close(a, x, atol=1e-5, rtol=1e-5, msg=f"t={int(t)}")


def test_iddpm_sampling_is_deterministic_per_generator():
    model = denoiser(learn_sigma=True)
    draw = lambda seed: sample(
        model, (N, C, H, W), sampler="iddpm", steps=100, cfg_scale=1.0, generator=torch.Generator().manual_seed(seed)
    )
    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (N, C, H, W) and torch.all(torch.isfinite(first))
    assert torch.equal(first, again) and not torch.allclose(first, other)


# ---------------------------------------------------------------------------------------------------
#                                  Classifier-free guidance
# ---------------------------------------------------------------------------------------------------


def captioned_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, 2C, H, W) that depends on the caption y (N, 2C) and needs a mask batched like x."""
    assert mask.shape[0] == y.shape[0] == x.shape[0]
    return x.repeat(1, 2, 1, 1) * y[:, :, None, None] + y[:, :, None, None]


def test_cfg_scale_one_is_the_conditional_output():
    y_cond, y_null = noise(1, (N, 2 * C)), noise(2, (N, 2 * C))
    mask = torch.ones(N, 3)
    x, t = noise(3), torch.full((N,), 500)
    guided = classifier_free_guidance(captioned_model, {"y": y_null}, cfg_scale=1.0)
    torch.testing.assert_close(guided(x, t, y=y_cond, mask=mask), captioned_model(x, t, y_cond, mask))


def test_guidance_channels_limit_which_eps_channels_are_guided():
    y_cond, y_null, x, t = noise(1, (N, 2 * C)), noise(2, (N, 2 * C)), noise(3), torch.full((N,), 500)
    mask = torch.ones(N, 3)
    cond, uncond = captioned_model(x, t, y_cond, mask), captioned_model(x, t, y_null, mask)
    full = uncond + 4.5 * (cond - uncond)

    everything = classifier_free_guidance(captioned_model, {"y": y_null}, 4.5)(x, t, y=y_cond, mask=mask)
    torch.testing.assert_close(everything[:, :C], full[:, :C])  # all 4 eps channels guided
    torch.testing.assert_close(everything[:, C:], cond[:, C:])  # the variance from the conditional pass

    reference = classifier_free_guidance(captioned_model, {"y": y_null}, 4.5, guidance_channels=3)
    out = reference(x, t, y=y_cond, mask=mask)
    torch.testing.assert_close(out[:, :3], full[:, :3])
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])  # eps channel 3 left unguided, as forward_with_cfg

    with pytest.raises(ValueError, match="guidance_channels=5"):
        guide(torch.cat([cond, uncond]), C, 4.5, guidance_channels=5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_sample_matches_the_diffusers_pixart_loop(prediction_type: str):
    """sample() with cfg 4.5 equals PixArtAlphaPipeline's loop: guide, drop the sigma half, step."""
    y_cond, y_null = noise(1, (N, 2 * C)), noise(2, (N, 2 * C))
    mask = torch.ones(N, 3)
    ours = sample(
        captioned_model, noise(), {"y": y_cond, "mask": mask}, {"y": y_null}, steps=20, cfg_scale=4.5,
        prediction_type=prediction_type,
    )  # fmt: skip

    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=prediction_type)
    scheduler.set_timesteps(20)
    x = noise()
    for t in scheduler.timesteps:
        out = captioned_model(torch.cat([x, x]), t.expand(2 * N), torch.cat([y_null, y_cond]), mask.repeat(2, 1))
        uncond, cond = out.chunk(2)
        eps = (uncond + 4.5 * (cond - uncond)).chunk(2, dim=1)[0]
        x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_sample_refuses_guidance_without_unconditional_kwargs():
    with pytest.raises(ValueError, match="uncond_kwargs"):
        sample(denoiser(), noise(), cfg_scale=4.5)


# ---------------------------------------------------------------------------------------------------
#                                            Respacing
# ---------------------------------------------------------------------------------------------------


def test_space_timesteps():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    hundred = space_timesteps(1000, "100")
    assert len(hundred) == 100
    assert hundred[:8] == [0, 10, 20, 30, 40, 50, 61, 71] and hundred[-3:] == [979, 989, 999]
    assert space_timesteps(1000, [1000]) == list(range(1000))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim300")  # strides 3 and 4 give 334 and 250


def test_respaced_diffusion_keeps_alphas_cumprod_and_calls_the_model_with_original_steps():
    base, spaced = create_diffusion(), create_diffusion("100")
    kept = torch.tensor(space_timesteps(1000, "100"))
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], atol=0, rtol=1e-12)
    assert spaced.num_timesteps == 100

    seen = []
    model = lambda x, t: seen.append(t.tolist()) or torch.zeros(x.shape[0], 2 * C, H, W)
    spaced.p_mean_variance(model, noise(), torch.tensor([99, 6]))
    assert seen == [[999, 61]]


def test_clip_x0_matches_diffusers_clip_sample():
    """Pixel-space sampling clamps x_0 as diffusers' DDIM / DDPM clip_sample do (eps re-derived for DDIM)."""
    model = denoiser()
    scheduler = DDIMScheduler(
        **SCHEDULE, prediction_type="epsilon", clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True,
        steps_offset=0, timestep_spacing="leading",
    )  # fmt: skip
    # eps re-derived from the clamped x_0, as guided-diffusion's DDIM (diffusers: use_clipped_model_output)
    theirs = run_diffusers(scheduler, model, noise(), 10, eta=0.0, use_clipped_model_output=True)
    ours = ddim(model, noise(), create_diffusion().alphas_cumprod, 10, 0.0, clip_x0=0.5)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {i}")
    final = sample(model, noise(), sampler="dpm-solver", steps=10, cfg_scale=1.0, learn_sigma=False, clip_x0=0.5)
    assert final.abs().max() <= 0.5 + 1e-6  # the last DPM-Solver step lands on the clamped x_0


def test_logit_normal_timesteps_concentrate_on_middle_noise():
    diffusion = create_diffusion()
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(20000, generator=g, distribution="logit_normal")
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) <= 999
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    # P(|z| < logit(0.75)) for z ~ N(0, 1) is 0.7267; uniform draws would put half there.
    assert abs(middle - 0.7267) < 0.02
    uniform = diffusion.sample_timesteps(20000, generator=g)
    assert abs(((uniform >= 250) & (uniform < 750)).float().mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="distribution='beta'"):
        diffusion.sample_timesteps(2, distribution="beta")
