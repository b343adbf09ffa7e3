"""One training stage as a Ray Train job (or in-process): the paper's stages 1 -> 2 -> 3 on feature shards.

`run_stage` is what orchestration calls; `train_worker` is the per-worker loop Ray Train runs (and that a
plain script can run in-process with `python -m tasks.ray_train CONFIG.json`). Training itself lives in
`models.training` (no Ray there); this module adds the distributed context, checkpoints Ray can restart
from (`ray.train.report`), metrics, TensorBoard, sample grids and the stage's outputs.

Workers are data-parallel ranks: `parallel_strategy="ddp"` (the default) replicates the model, EMA and
optimiser state on every rank; `"fsdp"` shards them per transformer block (PyTorch FSDP2), for PixArt-XL on
GPUs with less memory. Either way the files below have one layout, and a run resumes from a checkpoint any
strategy or world size wrote:

    <out>/checkpoints/step_<NNNNNNNN>/state.pt   full training state (official key layout + optimiser, EMA,
                                                RNG, each rank's loader position), the last K kept
    <out>/final.pt                              {"state_dict", "state_dict_ema", "model_config"}
    <out>/ema.pth                               the EMA weights alone (PixArt stages: load_pixart reads it)
    <out>/diffusers/                            the EMA transformer as a diffusers PixArtTransformer2DModel
    <out>/metrics.jsonl, <out>/tensorboard/     per-step loss, lr, grad norm, samples/s
    <out>/samples/step_<NNNNNNNN>.png             sample grids for fixed prompts (or classes) and seeds
    <out>/summary.json                          steps, samples seen, wall time, device-hours
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field

from models.dit import DiT, dit_from_state_dict
from models.pixart import PixArt
from models.pixart_checkpoint import build_from_config, model_config, save_pixart
from models.stages import StageModelConfig, build_stage1, build_stage2, build_stage3
from models.training.config import TrainConfig
from models.training.trainer import StepMetrics, Trainer
from storage.artifacts import Artifact
from storage.loader import LoaderConfig, build_loader, feature_shards
from storage.shards import ShardInfo


class StageRunConfig(BaseModel):
    """Everything one stage's training run depends on."""

    model: StageModelConfig
    train: TrainConfig
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    parallel_strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several workers: ddp replicates parameters, gradients and optimiser state on every "
        "worker; fsdp shards them (and the EMA) across workers, per transformer block, for PixArt-XL on GPUs "
        "with less memory. Same trajectory and checkpoints either way; fsdp gathers weights to save them.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU workers with gloo.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per worker; a worker runs as many torch threads (at least 1)."
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker when use_gpu (fractions allowed).")
    max_failures: int = Field(2, ge=0, description="Worker crashes Ray Train recovers from (from the last checkpoint).")
    worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="Nice value of the training workers. Ray starts its workers at 15, below every ordinary process "
        "of the machine; 0 is the ordinary priority (15 restores Ray's).",
    )
    data_filter: dict | None = Field(
        None, description="Stage 3 subset, e.g. {'min_side': 512}: keep samples whose original short side >= it."
    )
    sample_every: int = Field(0, ge=0, description="Steps between sample grids (0: only at the end).")
    sample_prompts: list[str] = Field(default_factory=list, description="Prompts of the sample grids.")
    sample_steps: int = Field(20, ge=1, description="DPM-Solver steps for the sample grids.")
    use_ray: bool = Field(True, description="Run under Ray Train; False runs the loop in this process.")

    # How a run executes, not what it computes: FSDP and DDP follow the same trajectory (tests/test_fsdp.py),
    # and reservations or retries do not change the weights. use_gpu stays in: it selects mixed precision.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"parallel_strategy", "cpus_per_worker", "gpus_per_worker", "max_failures", "worker_niceness", "use_ray"}
    )

    def identity(self) -> dict:
        """What the stage's artifact id hashes: the config minus how it executes."""
        return self.model_dump(mode="json", exclude=set(self.EXECUTION_FIELDS))


# ---------------------------------------------------------------------------------------------------
#                                     Building the stage's model
# ---------------------------------------------------------------------------------------------------


def load_stage_checkpoint(path: str | os.PathLike) -> torch.nn.Module:
    """A previous stage's final.pt as its model (raw weights: the reference initialises from them)."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return model_from_state(raw["model_config"], raw["state_dict"])


def model_from_state(config: dict, state_dict: dict) -> torch.nn.Module:
    """The model `describe` described, with these weights (a plain module on the CPU)."""
    if config.get("kind") == "dit":
        dit = dit_from_state_dict(state_dict, num_heads=config["num_heads"])
        dit.prediction_type = config.get("prediction_type", "epsilon")
        return dit
    model = build_from_config({k: v for k, v in config.items() if k != "kind"})
    model.load_state_dict(state_dict)
    return model


def build_model(cfg: StageModelConfig, init_model: str | None) -> torch.nn.Module:
    previous = load_stage_checkpoint(init_model) if init_model else None
    continued = cfg.stage == 1 and isinstance(previous, DiT)
    continued |= cfg.stage == 2 and previous is not None and not isinstance(previous, DiT)  # continue a PixArt
    if continued:
        previous.prediction_type = cfg.prediction_type  # as build_stage* do: what this stage trains
        return previous
    if cfg.stage == 1:
        return build_stage1(cfg)
    if cfg.stage == 2:
        return build_stage2(cfg, stage1=previous)[0]
    return build_stage3(cfg, stage2=previous)


def describe(model: torch.nn.Module) -> dict:
    if isinstance(model, DiT):
        return {"kind": "dit", "num_heads": model.num_heads, "prediction_type": model.prediction_type}
    return {"kind": "pixart", **model_config(model)}


# ---------------------------------------------------------------------------------------------------
#                                        The per-worker loop
# ---------------------------------------------------------------------------------------------------


def _context() -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, under Ray Train)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        world = ctx.get_world_size()
        import ray.train.torch

        return ctx.get_world_rank(), world, ray.train.torch.get_device(), True
    except Exception:  # not inside a Ray Train worker
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), False


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


class StageOutputs:
    """Rank 0's writer of metrics, TensorBoard events, checkpoints and sample grids."""

    def __init__(self, out_dir: Path, run: StageRunConfig, start_step: int):
        from tensorboardX import SummaryWriter

        self.out, self.run = out_dir, run
        self.metrics_path = out_dir / "metrics.jsonl"
        self._truncate_metrics(start_step)
        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step or None)

    def _truncate_metrics(self, step: int) -> None:
        """Drop lines a crashed run logged after its last checkpoint: they will be logged again."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def log(self, m: StepMetrics, samples_per_s: float) -> None:
        row = {**m.__dict__, "samples_per_s": samples_per_s}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if m.step % self.run.train.log_every == 0 or m.step == 1:
            for k in ("loss", "mse", "vb", "grad_norm", "lr"):
                self.tb.add_scalar(f"train/{k}", getattr(m, k), m.step)
            self.tb.add_scalar("train/samples_per_s", samples_per_s, m.step)

    def close(self):
        self.tb.close()


def train_worker(cfg: dict) -> None:
    """The loop on one worker. `cfg` is JSON-able (Ray ships it to every worker)."""
    import torch.distributed as dist

    run = StageRunConfig.model_validate(cfg["run"])
    rank, world, device, under_ray = _context()
    if under_ray:  # Ray sets OMP_NUM_THREADS from the reservation only if the driver's environment did not set it
        torch.set_num_threads(max(1, int(run.cpus_per_worker)))
    out = Path(cfg["out_dir"])
    if run.train.global_batch_size % world:
        raise ValueError(f"global_batch_size={run.train.global_batch_size} is not divisible by {world} workers")

    # 1. Model and trainer (same seed on every rank: identical initial weights before DDP or FSDP shares them)
    torch.manual_seed(run.train.seed)
    model = build_model(run.model, cfg.get("init_model"))
    fsdp = world > 1 and run.parallel_strategy == "fsdp"
    wrap = None
    if world > 1 and not fsdp:
        import ray.train.torch

        wrap = lambda m: ray.train.torch.prepare_model(m, move_to_device=False)  # noqa: E731 (DDP)
    trainer = Trainer(model, run.train, device=device, rank=rank, world_size=world, wrap=wrap, fsdp=fsdp)
    description = describe(trainer.model)

    # 2. Resume: Ray's checkpoint after a worker failure, else the newest one on disk (driver crash). Every rank
    # maps the file (its pages are shared) and keeps its part: all of it, or its FSDP shards.
    loader_states = None
    checkpoint_dir = _ray_checkpoint_dir() if under_ray else None
    checkpoint_dir = checkpoint_dir or _latest_checkpoint(out / "checkpoints")
    if checkpoint_dir is not None:
        state = torch.load(Path(checkpoint_dir) / "state.pt", map_location="cpu", weights_only=True, mmap=True)
        trainer.load_state_dict(state)
        loader_states = state["loader"]
        del state
    shards = [(url, ShardInfo(**info)) for url, info in cfg["shards"]]
    loader_cfg = run.loader.model_copy(update={"batch_size": run.train.global_batch_size // world})
    loader = build_loader(
        shards,
        loader_cfg,
        rank=rank,
        world_size=world,
        state=_loader_state(loader_states, rank, world, run.loader.split),
        keep_keys=set(cfg["keep_keys"]) if cfg.get("keep_keys") is not None else None,
    )
    outputs = StageOutputs(out, run, trainer.step) if rank == 0 else None
    sampler = GridSampler(cfg, run, out) if rank == 0 else None

    # 3. Train
    def on_checkpoint(step: int) -> None:
        states = _gather(loader.state_dict(), world)
        metrics = {"step": step, "loss": outputs_last["loss"]}
        state = trainer.state_dict()  # every rank: under FSDP this gathers the shards to rank 0
        if rank == 0:
            path = out / "checkpoints" / f"step_{step:08d}"
            path.mkdir(parents=True, exist_ok=True)
            torch.save({**state, "loader": states, "model_config": description}, path / "state.pt.tmp")
            os.replace(path / "state.pt.tmp", path / "state.pt")
            for old in sorted((out / "checkpoints").glob("step_*"))[: -run.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            if sampler and (run.sample_every and step % run.sample_every == 0):
                sampler.grid(_ema_module(trainer, description, state["state_dict_ema"]), step)
        if under_ray:
            import ray.train

            ckpt = ray.train.Checkpoint.from_directory(str(path)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
        elif world > 1:
            dist.barrier()

    outputs_last = {"loss": float("nan")}

    def on_metrics(m: StepMetrics, sps: float) -> None:
        outputs_last["loss"] = m.loss
        if outputs:
            outputs.log(m, sps * 1.0)

    batches = iter(loader)
    summary = trainer.fit(
        ({**b, "index": _global_index(b, rank, loader_cfg.batch_size)} for b in batches),
        run.train.steps,
        on_metrics,
        on_checkpoint,
    )

    # 4. Outputs of the stage (rank 0; every rank gathers under FSDP)
    weights, ema_weights = trainer.weights()
    if rank == 0:
        outputs.close()
        final = {"state_dict": weights, "state_dict_ema": ema_weights, "model_config": description}
        torch.save(final, out / "final.pt")
        ema = _ema_module(trainer, description, ema_weights)
        if isinstance(ema, PixArt):
            save_pixart(ema, out / "ema.pth")
            from models.convert_pixart import pixart_to_diffusers

            pixart_to_diffusers(ema).save_pretrained(out / "diffusers")
        sampler.grid(ema, trainer.step)
        previous = _read_json(out / "summary.json")
        summary_dict = {
            "stage": run.model.stage,
            "steps": trainer.step,
            "samples_seen": trainer.step * run.train.global_batch_size,
            "wall_seconds": summary.wall_seconds + previous.get("wall_seconds", 0.0),
            "device_hours": summary.device_hours + previous.get("device_hours", 0.0),
            "device": device.type,
            "world_size": world,
            "nonfinite_steps": trainer.nonfinite_steps,
            "final_loss": summary.losses[-1] if summary.losses else None,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
        }
        (out / "summary.json").write_text(json.dumps(summary_dict, indent=1))


def _ema_module(trainer: Trainer, description: dict, ema_weights: dict) -> torch.nn.Module:
    """The EMA as a plain module on the trainer's device, for sampling and export: the trainer's own, or under
    FSDP one rebuilt on rank 0 from the gathered weights (without drawing from the training RNG)."""
    if not trainer.fsdp:
        return trainer.ema
    with torch.random.fork_rng(devices=[]):
        return model_from_state(description, ema_weights).eval().requires_grad_(False).to(trainer.device)


def _global_index(batch: dict, rank: int, per_rank: int) -> torch.Tensor:
    """Positions of this rank's samples in the global batch (seeds their noise and timesteps)."""
    return torch.arange(len(batch["keys"])) + rank * per_rank


def _loader_state(saved: list[dict] | None, rank: int, world: int, split: str) -> dict | None:
    """This rank's position from a checkpoint's per-rank loader positions. With split="batches" a position
    counts global batches, the same on every rank, so it carries over to another world size."""
    if not saved:
        return None
    if len(saved) == world:
        return saved[rank]
    if split == "batches":
        return saved[0]
    raise ValueError(
        f"the checkpoint holds the loader positions of {len(saved)} workers but this run has {world}; with "
        f"loader.split='shards' resume with num_workers={len(saved)} (split='batches' positions carry over)"
    )


def _ray_checkpoint_dir() -> str | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    return checkpoint.to_directory()


def _latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(p for p in directory.glob("step_*") if (p / "state.pt").exists()) if directory.is_dir() else []
    return found[-1] if found else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


# ---------------------------------------------------------------------------------------------------
#                                           Sample grids
# ---------------------------------------------------------------------------------------------------


class GridSampler:
    """Fixed prompts (or class labels for stage 1) and seeds -> a PNG grid, from the EMA weights."""

    def __init__(self, cfg: dict, run: StageRunConfig, out: Path):
        self.cfg, self.run, self.out = cfg, run, out
        self._encoder = self._codec = None

    def _components(self):
        from models.pixel_codec import build_latent_codec
        from models.text_encoder import T5TextEncoder

        if self._codec is None and self.cfg.get("codec"):
            self._codec = build_latent_codec(**self.cfg["codec"])
        if self._encoder is None and self.cfg.get("text_encoder"):
            self._encoder = T5TextEncoder.from_pretrained(self.cfg["text_encoder"])
        return self._encoder, self._codec

    @torch.no_grad()
    def grid(self, model: torch.nn.Module, step: int) -> Path | None:
        """Write samples/step_N.png; None when no codec is configured (nothing to decode with)."""
        from models.diffusion import sample
        from models.generate import generate_latents
        from models.grid import to_grid

        encoder, codec = self._components()
        if codec is None:
            return None
        model.eval()
        generator = torch.Generator().manual_seed(self.run.train.seed)
        h = w = model.input_size
        if isinstance(model, DiT):  # stage 1: one sample per class, classifier-free guided
            labels = torch.arange(min(8, model.y_embedder.num_classes))
            noise = torch.randn((len(labels), model.in_channels, h, w), generator=generator)
            null = torch.full_like(labels, model.y_embedder.num_classes)
            latents = sample(model, noise, {"y": labels}, {"y": null}, steps=self.run.sample_steps, cfg_scale=4.0,
                             learn_sigma=model.learn_sigma, clip_x0=getattr(codec, "clip_range", None),
                             prediction_type=model.prediction_type)  # fmt: skip
        elif self.run.sample_prompts and encoder is not None:
            f = codec.downsample_factor
            latents = generate_latents(
                model,
                encoder,
                self.run.sample_prompts,
                latent_hw=(h, w),
                image_hw=(h * f, w * f),
                steps=self.run.sample_steps,
                generator=generator,
                clip_x0=getattr(codec, "clip_range", None),
            )
        else:
            return None
        path = self.out / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_grid(codec.decode(latents.to(codec.device)), rows=1).save(path)
        return path


# ---------------------------------------------------------------------------------------------------
#                                            The driver
# ---------------------------------------------------------------------------------------------------


def selected_keys(data_filter: dict | None, features: Artifact, store_root: str) -> list[str] | None:
    """Keys the stage trains on: all (None), or those the ingest manifest's columns pass.

    data_filter: {"min_side": N} keeps images whose original short side is at least N pixels;
    {"column": name, "min": value} keeps rows of the ingest samples table with column >= value.
    """
    if not data_filter:
        return None
    from storage.artifacts import ArtifactStore
    from storage.tables import read_rows

    store, todo, ingest = ArtifactStore(store_root), list(features.upstream), None
    while todo and ingest is None:
        art = store.get(todo.pop(0))
        ingest = art if art.stage == "ingest" else None
        todo.extend(art.upstream)
    if ingest is None:
        raise ValueError(f"data_filter needs the ingest manifest, but no ingest artifact is upstream of {features.id}")
    rows = read_rows(ingest.path("samples.parquet"))
    keep = []
    for row in rows:
        if "min_side" in data_filter and min(row["width"], row["height"]) < data_filter["min_side"]:
            continue
        if "column" in data_filter and float(row.get(data_filter["column"]) or 0) < data_filter["min"]:
            continue
        keep.append(row["key"])
    if not keep:
        raise ValueError(f"data_filter {data_filter} keeps none of the {len(rows)} samples")
    return keep


def run_stage(
    config: StageRunConfig,
    features: Artifact,
    out: Artifact,
    *,
    init_model: str | None = None,
    text_encoder: str | None = None,
    codec: dict | None = None,
    ray_address: str | None = None,
) -> dict:
    """Train one stage on a complete feature artifact into `out` (resuming from its checkpoints); returns
    the paths of its outputs. A complete `out` is returned as is.

    init_model: the previous stage's final.pt. text_encoder / codec ({"kind": "pixel", "factor": 4} or
    {"kind": "vae", "vae": id_or_dir}): only for sample grids. ray_address: a Ray cluster ("auto" inside
    one); None starts or reuses a local instance. Outputs go to the artifact's directory, which must be a
    local or shared file system path that every Ray worker can write.
    """
    if out.complete:
        return out.manifest["summary"]["outputs"]
    out_dir = Path(out.url).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = selected_keys(config.data_filter, features, out.root)
    cfg = {
        "run": config.model_dump(mode="json"),
        "shards": [(url, info.to_dict()) for url, info in feature_shards(features)],
        "out_dir": str(out_dir),
        "init_model": init_model,
        "text_encoder": text_encoder,
        "codec": codec,
        "keep_keys": keys,
    }
    start = time.perf_counter()
    if config.use_ray:
        _fit_with_ray(cfg, config, out_dir, ray_address)
    else:
        train_worker(cfg)
    outputs = {
        "final": str(out_dir / "final.pt"),
        "ema": str(out_dir / "ema.pth") if (out_dir / "ema.pth").exists() else None,
        "diffusers": str(out_dir / "diffusers") if (out_dir / "diffusers").exists() else None,
        "tensorboard": str(out_dir / "tensorboard"),
        "metrics": str(out_dir / "metrics.jsonl"),
        "grids": sorted(str(p) for p in (out_dir / "samples").glob("*.png")),
    }
    training = _read_json(out_dir / "summary.json")
    out.finish({"outputs": outputs, "training": training, "driver_seconds": time.perf_counter() - start})
    return outputs


def _fit_with_ray(cfg: dict, config: StageRunConfig, out_dir: Path, ray_address: str | None) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            # The dashboard serves the State API Ray Train's placement-group cleaner polls
            ray.init(include_dashboard=True, object_store_memory=200 * 2**20, log_to_driver=False)
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(out_dir),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_last),
            # Ray's workers start at nice 15: any ordinary process (the flow's, the Prefect server, another job)
            # then preempts a training thread, and with intra-op threads every other thread waits for it
            worker_runtime_env={"env_vars": {"RAY_worker_niceness": str(config.worker_niceness)}},
        ),
    )
    result = trainer.fit()
    if getattr(result, "error", None):
        raise result.error


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.ray_train CONFIG.json`: run `train_worker` in this process (no Ray)."""
    import sys

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m tasks.ray_train CONFIG.json  (the cfg dict run_stage builds)")
    train_worker(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
