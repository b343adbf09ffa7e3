"""The training step and loop, apart from any orchestration (Ray Train and Prefect call it, so can a script).

Every random draw of a step (timestep, noise, caption/class dropout) comes from a generator seeded by
(seed, step, global sample index). Two consequences we rely on:
- resume is exact: the step after a restart draws what the uninterrupted run would have drawn;
- N workers on slices of a global batch compute the same per-sample losses as one worker on the whole
  batch, so DDP, FSDP and single-process runs follow the same trajectory (up to float summation order).

Under FSDP (`fsdp=True`) the model and its EMA are sharded alike over the ranks, and `state_dict` gathers
full weights and optimiser state in the layout a single process writes, so checkpoints move between
strategies and world sizes.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from models.diffusion import GaussianDiffusion, create_diffusion
from models.dit import DiT
from models.pixart import PixArtMS
from models.training.config import TrainConfig
from models.training.optim import build_optimizer, lr_factor, update_ema


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A CPU generator for one sample of one step; well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def resolve_precision(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


@dataclass
class StepMetrics:
    step: int
    loss: float
    mse: float
    vb: float
    grad_norm: float
    lr: float
    skipped: bool = False


@dataclass
class TrainSummary:
    steps: int
    samples_seen: int
    wall_seconds: float
    device_hours: float
    device: str
    world_size: int
    nonfinite_steps: int
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Optimiser, EMA, schedule and the diffusion loss around one model (DiT or PixArt / PixArtMS).

    Batches are dicts: `x` (N, C, H, W) latents; for PixArt `y` (N, L, C_text) and `mask` (N, L); for
    PixArtMS also `img_hw` (N, 2) and `aspect_ratio` (N, 1); for DiT `cls` (N,) labels; optionally `index`
    (N,) the samples' positions in the global batch (default rank * N + arange(N)).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        fsdp: bool = False,
    ):
        """wrap: a data-parallel wrapper for the forward and backward (e.g. DDP); the EMA stays a replica.
        fsdp: shard parameters, gradients, optimiser state and the EMA over the default process group."""
        if wrap is not None and fsdp:
            raise ValueError("wrap (e.g. DDP) and fsdp=True are exclusive: FSDP is the data-parallel wrapper")
        self.config = config
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.fsdp = fsdp
        self.model = model.train()
        if config.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if fsdp:
            shard_by_block(self.model, self.device, world_size)
            shard_by_block(self.ema, self.device, world_size)  # same layout: each rank averages its own shards
        else:
            self.model.to(self.device)
            self.ema.to(self.device)
        self.net = wrap(self.model) if wrap else self.model  # e.g. DistributedDataParallel
        learn_sigma = getattr(model, "pred_sigma", getattr(model, "learn_sigma", True))
        prediction_type = getattr(model, "prediction_type", "epsilon")  # what the loss's target is
        self.diffusion: GaussianDiffusion = create_diffusion(learn_sigma=learn_sigma, prediction_type=prediction_type)
        lr = config.optimizer.effective_lr(config.global_batch_size)
        self.optimizer = build_optimizer(self.model, config.optimizer, lr)  # after sharding: over the shards
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config.optimizer, config.steps))
        self.amp_dtype = resolve_precision(config.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.nonfinite_steps = 0
        self._nonfinite_in_row = 0

    # -- one step ---------------------------------------------------------------------------------

    def _dropout_prob(self) -> float:
        embedder = self.model.y_embedder
        return getattr(embedder, "uncond_prob", getattr(embedder, "dropout_prob", 0.0))

    def _draws(self, batch: dict, n: int, shape: tuple[int, ...]):
        """Per-sample timestep, noise and dropout decision from (seed, step, global index)."""
        index = batch.get("index")
        if index is None:
            index = torch.arange(n) + self.rank * n
        p = self._dropout_prob()
        t, noise, drop = [], [], []
        for i in index.tolist():
            g = sample_generator(self.config.seed, self.step, int(i))
            t.append(self.diffusion.sample_timesteps(1, generator=g, distribution=self.config.timestep_sampling)[0])
            noise.append(torch.randn(shape, generator=g))
            drop.append(bool(torch.rand((), generator=g) < p))
        return torch.stack(t), torch.stack(noise), torch.tensor(drop, dtype=torch.long)

    def model_kwargs(self, batch: dict, drop: torch.Tensor) -> dict:
        dev = self.device
        if isinstance(self.model, DiT):
            null = self.model.y_embedder.num_classes
            return {"y": torch.where(drop.bool(), null, batch["cls"].long()).to(dev)}
        kwargs = {"y": batch["y"].to(dev), "mask": batch["mask"].to(dev), "force_drop_ids": drop.to(dev)}
        if isinstance(self.model, PixArtMS):
            kwargs["data_info"] = {"img_hw": batch["img_hw"].to(dev), "aspect_ratio": batch["aspect_ratio"].to(dev)}
        return kwargs

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def train_step(self, batch: dict) -> StepMetrics:
        x0 = batch["x"].to(self.device, torch.float32)  # (N, C, H, W)
        n = x0.shape[0]
        t, noise, drop = self._draws(batch, n, tuple(x0.shape[1:]))
        kwargs = self.model_kwargs(batch, drop)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            losses = self.diffusion.training_losses(self.net, x0, t.to(self.device), kwargs, noise.to(self.device))
        loss = losses["loss"].mean()
        stats = self._global_mean(
            torch.stack([loss.detach(), losses["mse"].mean().detach(), losses.get("vb", loss * 0).mean().detach()])
        )

        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = torch.tensor(float("nan"))
        scaled = self.scaler.scale(loss)  # also sets the initial scale, which a skipped first step backs off
        if torch.isfinite(stats[0]):  # every rank sees the same global loss: all skip or none
            scaled.backward()
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.grad_clip)
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards, replicated on every rank
                grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(stats[0])) and bool(torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            update_ema(self.ema, self.model, self.config.ema_decay)
            self._nonfinite_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                # Back off explicitly rather than from this rank's own inf check: under FSDP a rank sees only
                # its shards, and every rank must keep the same scale (the reduced gradients mix them).
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.nonfinite_steps += 1
            self._nonfinite_in_row += 1
            if self._nonfinite_in_row >= self.config.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self._nonfinite_in_row} consecutive steps with a non-finite loss or gradient "
                    f"(last at step {self.step}); lower the learning rate or check the data"
                )
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        return StepMetrics(self.step, *(float(v) for v in stats), float(grad_norm), lr, skipped=not finite)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(
        self,
        batches: Iterator[dict],
        until_step: int,
        on_metrics: Callable[[StepMetrics, float], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
    ) -> TrainSummary:
        """Train until `until_step`; calls on_metrics(metrics, samples_per_second) every step and
        on_checkpoint(step) every `checkpoint_every` steps and at the end."""
        start, start_step, losses = time.perf_counter(), self.step, []
        while self.step < until_step:
            t0 = time.perf_counter()
            metrics = self.train_step(next(batches))
            losses.append(metrics.loss)
            if on_metrics:
                on_metrics(metrics, self.config.global_batch_size / max(time.perf_counter() - t0, 1e-9))
            if on_checkpoint and (self.step % self.config.checkpoint_every == 0 or self.step == until_step):
                on_checkpoint(self.step)
        wall = time.perf_counter() - start
        return TrainSummary(
            steps=self.step - start_step,
            samples_seen=(self.step - start_step) * self.config.global_batch_size,
            wall_seconds=wall,
            device_hours=wall * self.world_size / 3600,
            device=self.device.type,
            world_size=self.world_size,
            nonfinite_steps=self.nonfinite_steps,
            losses=losses,
        )

    # -- state ------------------------------------------------------------------------------------

    def weights(self) -> tuple[dict, dict]:
        """Full model and EMA state dicts in the official key layout. Under FSDP every rank must call it (it
        gathers the shards); rank 0 gets them on the CPU, the other ranks empty dicts."""
        if not self.fsdp:
            return self.model.state_dict(), self.ema.state_dict()
        return get_model_state_dict(self.model, options=_FULL), get_model_state_dict(self.ema, options=_FULL)

    def state_dict(self) -> dict:
        """Weights in the official key layout plus everything exact resume needs; the same layout whatever
        the strategy. Under FSDP every rank must call it, and only rank 0's weights and optimiser are full."""
        model, ema = self.weights()
        if self.fsdp:  # keyed by parameter name; index them as `Optimizer.state_dict` does
            optimizer = _optimizer_by_index(get_optimizer_state_dict(self.model, self.optimizer, options=_FULL))
        else:
            optimizer = self.optimizer.state_dict()
        return {
            "state_dict": model,
            "state_dict_ema": ema,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        """A full state (from any strategy); under FSDP every rank passes it and keeps its own shards."""
        if self.fsdp:
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["state_dict"], options=options)
            set_model_state_dict(self.ema, state["state_dict_ema"], options=options)
            names = {p: name for name, p in self.model.named_parameters()}
            order = [names[p] for group in self.optimizer.param_groups for p in group["params"]]
            optimizer = _optimizer_by_name(state["optimizer"], order)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=options)
        else:
            self.model.load_state_dict(state["state_dict"])
            self.ema.load_state_dict(state["state_dict_ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        torch.set_rng_state(state["rng"]["torch"])
        _set_numpy_state(state["rng"]["numpy"])


# ---------------------------------------------------------------------------------------------------
#                                   FSDP: sharding and full states
# ---------------------------------------------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, on rank 0's CPU


def shard_by_block(model: nn.Module, device: torch.device, world_size: int) -> None:
    """FSDP2 (`fully_shard`, in place) over all ranks: one unit per transformer block, whose parameters are
    gathered only around its own forward and backward, and the root unit for the embedders and final layer.

    Parameters stay fp32 (autocast does the mixed precision, as without FSDP): PixArt casts timesteps and
    size conditions to its parameter dtype, and bf16 would round t = 999 to a multiple of 4.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # each unit moves its parameters and buffers to `device` as it shards them


def _optimizer_by_index(state: dict) -> dict:
    """A name-keyed optimiser state dict (torch.distributed.checkpoint's) -> `Optimizer.state_dict`'s layout,
    parameters numbered in param-group order. Ranks other than 0 have an empty one."""
    if not state:
        return state
    index = {name: i for i, name in enumerate(name for g in state["param_groups"] for name in g["params"])}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]],
    }


def _optimizer_by_name(state: dict, names: list[str]) -> dict:
    """The inverse of `_optimizer_by_index`: `names` are the parameters' names in param-group order."""
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": [has_gauss, cached]}


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["gauss"][0], state["gauss"][1]))
