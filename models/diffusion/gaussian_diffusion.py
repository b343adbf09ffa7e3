"""The Gaussian diffusion process of IDDPM as PixArt-alpha trains it: noising, posterior, hybrid loss.

After `gaussian_diffusion.py` of openai/improved-diffusion and facebookresearch/DiT, reduced to what PixArt
uses: epsilon prediction, a learned-range variance (or the fixed "large" one when sigma is not learned),
and the hybrid loss L_simple + L_vlb (Nichol & Dhariwal 2021, "Improved DDPM"); v prediction as an option
(see `parameterization.py`). The network is an argument: `model(x, t, **model_kwargs)` returns
(N, 2C, H, W) (the prediction, then variance interpolation values in [-1, 1]) or (N, C, H, W) (the
prediction only).

Schedule arrays are float64, as IDDPM keeps them in float64 numpy; they are cast to the input dtype at use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from models.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from models.diffusion.parameterization import PredictionType, check_prediction_type, training_target, x0_and_eps

TimestepSampling = Literal["uniform", "logit_normal"]

# model(x (N, C, H, W), t (N,) int64 in the original 1000-step scale, **model_kwargs) -> (N, C or 2C, H, W)
DenoiserFn = Callable[..., torch.Tensor]


def linear_beta_schedule(num_steps: int = 1000) -> torch.Tensor:
    """DDPM's linear betas 1e-4 -> 0.02, rescaled as IDDPM's `get_named_beta_schedule("linear")` does.

    The scale 1000 / num_steps keeps the total noise comparable for other step counts; at 1000 steps it is 1.
    """
    scale = 1000 / num_steps
    return torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64))


def split_output(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, ...) -> (eps, None); (N, 2C, ...) -> (eps, variance values), each (N, C, ...)."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        eps, var_values = out.split(channels, dim=1)
        return eps, var_values
    raise ValueError(
        f"model output has {out.shape[1]} channels; expected {channels} (epsilon) or {2 * channels} "
        f"(epsilon and learned-range variance) for an input with {channels} channels"
    )


def _extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] in `like`'s dtype and device, shaped (N, 1, 1, ...) to broadcast over `like`."""
    # Index on the CPU so the float64 table never has to exist on the accelerator (MPS has no float64).
    out = arr[t.cpu()].to(device=like.device, dtype=like.dtype)  # (N,)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """Forward process q, reverse process p and training loss for given betas.

    `timestep_map[i]` is the original timestep that step i of this process stands for; the model is always
    called with original timesteps, so a respaced diffusion (see `respace.py`) drives the same network.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        learn_sigma: bool = True,
        timestep_map: torch.Tensor | None = None,
        prediction_type: PredictionType = "epsilon",
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must be a 1-D schedule of at least 2 values in (0, 1], got {tuple(betas.shape)}")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.prediction_type = check_prediction_type(prediction_type)
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.long()

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)  # alpha-bar_t, (T,)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # Without a learned sigma, DiT/PixArt use the "fixed large" variance: beta_t, beta-tilde_1 at t = 0.
        self.fixed_large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])

    # -----------------------------------------------------------------------------------------------
    #                                       Forward process
    # -----------------------------------------------------------------------------------------------

    def sample_timesteps(
        self,
        n: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        distribution: TimestepSampling = "uniform",
    ) -> torch.Tensor:
        """(n,) int64 timesteps in [0, T).

        "uniform" is PixArt's (no loss-aware sampler). "logit_normal" (SD3, Esser et al. 2024) draws
        t / T = sigmoid(N(0, 1)): most draws at middle noise levels, where layout and colour are decided, few at
        the ends, where x_t is nearly pure noise or nearly clean. It makes a small model learn composition in
        far fewer steps (the CPU demo).
        """
        if distribution == "uniform":
            return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        if distribution == "logit_normal":
            u = torch.sigmoid(torch.randn((n,), device=device, generator=generator))
            return (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        raise ValueError(f"distribution={distribution!r}; expected 'uniform' or 'logit_normal'")

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps; all (N, C, H, W), t (N,)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean (N, C, H, W), variance and clipped log variance (N, 1, 1, 1) of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return (
            mean,
            _extract(self.posterior_variance, t, x_t),
            _extract(self.posterior_log_variance_clipped, t, x_t),
        )

    # -----------------------------------------------------------------------------------------------
    #                                       Reverse process
    # -----------------------------------------------------------------------------------------------

    def run_model(
        self, model: DenoiserFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """Call the network with the original timesteps this process's steps `t` stand for."""
        return model(x, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))

    def _split(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like `split_output`, and checks the output carries a variance exactly when sigma is learned."""
        eps, var_values = split_output(out, channels)
        if self.learn_sigma != (var_values is not None):
            expected = 2 * channels if self.learn_sigma else channels
            raise ValueError(
                f"learn_sigma={self.learn_sigma} needs {expected} output channels, the model gives {out.shape[1]}"
            )
        return eps, var_values

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def p_mean_variance_from_output(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_x0: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Mean, log variance and predicted x_0 of p(x_{t-1} | x_t) for a model output (N, C or 2C, H, W).

        clip_x0 clamps the predicted x_0 (IDDPM's clip_denoised, for pixel-space data)."""
        pred, var_values = self._split(out, x.shape[1])

        if var_values is None:
            log_variance = torch.log(_extract(self.fixed_large_variance, t, x)).expand_as(x)
        else:
            # Learned range (IDDPM eq. 15): v in [-1, 1] interpolates log beta_t and log beta-tilde_t.
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(torch.log(self.betas), t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log  # (N, C, H, W)

        if self.prediction_type == "epsilon":
            pred_xstart = self.predict_xstart_from_eps(x, t, pred)
        else:
            alpha, sigma = _extract(self.sqrt_alphas_cumprod, t, x), _extract(self.sqrt_one_minus_alphas_cumprod, t, x)
            pred_xstart, _ = x0_and_eps(self.prediction_type, pred, x, alpha, sigma)
        if clip_x0 is not None:
            pred_xstart = pred_xstart.clamp(-clip_x0, clip_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: DenoiserFn,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        clip_x0: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model on x_t (N, C, H, W) at steps t (N,) and return p(x_{t-1} | x_t)'s parameters."""
        return self.p_mean_variance_from_output(self.run_model(model, x, t, model_kwargs), x, t, clip_x0)

    def p_sample(
        self,
        model: DenoiserFn,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}; no noise is added at the last step (t = 0)."""
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_x0)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (N, 1, 1, 1)
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop_progressive(
        self,
        model: DenoiserFn,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> Iterator[torch.Tensor]:
        """Ancestral sampling from x_T = noise (N, C, H, W); yields x after each of the T steps (last x_0)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, model_kwargs, generator, clip_x0)
            yield x

    # -----------------------------------------------------------------------------------------------
    #                                          Training
    # -----------------------------------------------------------------------------------------------

    def vb_terms_bpd(
        self, out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_vlb per sample (N,), in bits per dimension: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: DenoiserFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (N,) for clean latents x_start (N, C, H, W) noised to steps t (N,).

        Keys: `mse` (L_simple on the prediction: epsilon or v), `vb` (L_vlb, only with a learned sigma) and
        `loss` (their sum).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = self.run_model(model, x_t, t, model_kwargs)
        pred, var_values = self._split(out, x_start.shape[1])
        alpha = _extract(self.sqrt_alphas_cumprod, t, x_start)
        sigma = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start)
        target = training_target(self.prediction_type, x_start, noise, alpha, sigma)
        terms = {"mse": mean_flat((target - pred) ** 2)}
        if var_values is None:
            terms["loss"] = terms["mse"]
            return terms
        # Stop-gradient on the mean: L_vlb trains only the variance, the mean is left to L_simple (IDDPM 3.1).
        frozen = torch.cat([pred.detach(), var_values], dim=1)  # (N, 2C, H, W)
        # IDDPM's T / 1000 (its RESCALED_MSE; PixArt's plain MSE omits it): the two agree at T = 1000.
        terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms
