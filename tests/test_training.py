"""Three-stage training: the stage chain, Ray Train DDP vs one process, exact resume after a kill."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from models.dit import DiT
from models.pixart import PixArt, PixArtMS
from models.pixart_checkpoint import load_pixart
from models.pixel_codec import PixelCodec
from models.stages import StageModelConfig
from models.text_encoder import T5TextEncoder
from models.training.config import OptimizerConfig, TrainConfig
from models.training.trainer import NonFiniteLossError, Trainer
from storage.artifacts import ArtifactStore
from storage.features import extract_features
from storage.ingest import ingest
from storage.loader import LoaderConfig
from storage.sources.shapes import ShapesConfig, ShapesSource
from tasks.ray_train import StageRunConfig, build_model, feature_shards, run_stage

ROOT = Path(__file__).resolve().parents[1]
OPT = OptimizerConfig(lr=1e-3, warmup_steps=5, grad_clip=1.0, lr_scaling="none")
PROMPTS = ["a large red circle on a gray background"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny):
    """Feature shards of 64 shapes at 32 px (two aspect ratios), pixel codec x4: 48 x 8 x 8 latents."""
    store = ArtifactStore(str(tmp_path_factory.mktemp("store")))
    shapes = ShapesConfig(count=64, image_size=32, aspect_ratios=["1.0", "0.5"])
    images = store.artifact("ingest", {"shapes": shapes.model_dump()})
    ingest(ShapesSource(shapes), images, samples_per_shard=16, progress=False)
    features = store.artifact("features", {"codec": "pixel"}, upstream=[images.id])
    t5 = T5TextEncoder.from_pretrained(tiny.t5_dir)
    extract_features(images, features, t5, PixelCodec(factor=4), base_resolution=32, batch_size=16, progress=False)
    return store, features


def stage_run(stage: int, steps: int = 6, **overrides) -> StageRunConfig:
    model = StageModelConfig(
        stage=stage, model="PixArt-T/2", input_size=8, in_channels=48, caption_channels=32, num_classes=40
    )
    train = TrainConfig(steps=steps, global_batch_size=8, optimizer=OPT, checkpoint_every=3, ema_decay=0.9, seed=1)
    loader = LoaderConfig(num_workers=0, shuffle_buffer=16, split="batches")
    settings = {"use_ray": False, "sample_prompts": PROMPTS, "sample_steps": 4, **overrides}
    return StageRunConfig(model=model, train=train, loader=loader, **settings)


def run(store, features, config, name, previous=None, tiny=None):
    out = store.artifact(name, config.model_dump(), upstream=[features.id] + ([previous.id] if previous else []))
    outputs = run_stage(
        config,
        features,
        out,
        init_model=str(Path(previous.url) / "final.pt") if previous else None,
        text_encoder=str(tiny.t5_dir) if tiny else None,
        codec={"kind": "pixel", "factor": 4},
    )
    return out, outputs


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out.url) / "metrics.jsonl").read_text().splitlines()]


def test_stage_chain_each_stage_starts_from_the_previous(data, tiny):
    store, features = data
    s1, o1 = run(store, features, stage_run(1), "stage1", tiny=tiny)
    s2, o2 = run(store, features, stage_run(2), "stage2", previous=s1, tiny=tiny)
    s3, o3 = run(store, features, stage_run(3), "stage3", previous=s2, tiny=tiny)

    # stage 2 starts from stage 1's weights, re-parameterised; stage 3 from stage 2's
    dit = build_model(stage_run(1).model, o1["final"])
    pixart = build_model(stage_run(2).model, o1["final"])
    assert isinstance(dit, DiT) and isinstance(pixart, PixArt)
    torch.testing.assert_close(pixart.t_embedder.mlp[0].weight, dit.t_embedder.mlp[0].weight)
    ms = build_model(stage_run(3).model, o2["final"])
    assert isinstance(ms, PixArtMS)
    stage2_final = torch.load(o2["final"], weights_only=True)["state_dict"]
    torch.testing.assert_close(ms.blocks[1].attn.qkv.weight, stage2_final["blocks.1.attn.qkv.weight"])

    # per-stage outputs
    for out, outputs in ((s1, o1), (s2, o2), (s3, o3)):
        assert out.complete and Path(outputs["final"]).is_file() and outputs["grids"]
        assert any(Path(outputs["tensorboard"]).glob("events.out.tfevents.*"))
        summary = out.manifest["summary"]["training"]
        assert summary["steps"] == 6 and summary["samples_seen"] == 48 and summary["device_hours"] > 0
        assert len(losses(out)) == 6 and all(v == v for v in losses(out))
    assert isinstance(load_pixart(o3["ema"]), PixArtMS)
    assert isinstance(PixArtTransformer2DModel.from_pretrained(o2["diffusers"]), PixArtTransformer2DModel)

    # a complete stage is not trained again
    again, _ = run(store, features, stage_run(2), "stage2", previous=s1, tiny=tiny)
    assert again.id == s2.id and (Path(s2.url) / "metrics.jsonl").read_text().count("\n") == 6


def test_stage_three_trains_on_the_filtered_subset(data):
    store, features = data
    config = stage_run(3, data_filter={"column": "aspect_ratio", "min": 0.75})  # square images only
    out, _ = run(store, features, config, "stage3")
    assert out.complete
    with pytest.raises(ValueError, match="keeps none"):
        run(store, features, stage_run(3, data_filter={"min_side": 10_000}), "stage3")


@pytest.mark.slow
def test_two_ray_workers_follow_the_single_process_trajectory(data, ray_local):
    """DDP over 2 Ray Train workers (gloo) with split="batches" vs one process, same global batch of 8."""
    store, features = data
    single, _ = run(store, features, stage_run(2, steps=5), "stage2")
    double, _ = run(store, features, stage_run(2, steps=5, use_ray=True, num_workers=2), "stage2_ddp")
    # same per-sample data, noise and timesteps; only the gradient all-reduce's float order differs
    torch.testing.assert_close(torch.tensor(losses(double)), torch.tensor(losses(single)), atol=1e-4, rtol=1e-4)
    a = torch.load(Path(single.url) / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(double.url) / "final.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_killed_run_resumes_exactly(data, tmp_path):
    """SIGKILL the training process once its step-6 checkpoint exists; the resumed run matches an uninterrupted one."""
    store, features = data
    steps = 30
    reference, _ = run(store, features, stage_run(2, steps=steps), "stage2_reference")

    out_dir = tmp_path / "killed"
    cfg = {
        "run": stage_run(2, steps=steps).model_dump(mode="json"),
        "shards": [(url, info.to_dict()) for url, info in feature_shards(features)],
        "out_dir": str(out_dir),
        "init_model": None,
        "text_encoder": None,
        "codec": None,
        "keep_keys": None,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    command = [sys.executable, "-m", "tasks.ray_train", str(tmp_path / "cfg.json")]
    # one thread, like this test process (conftest): bit-identical float reductions in both runs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not (out_dir / "checkpoints" / "step_00000006" / "state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its step-6 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert 6 <= len(logged) < steps  # it really died in the middle

    subprocess.run(command, cwd=ROOT, env=env, check=True)

    resumed = [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed == losses(reference)  # every step's loss, bit for bit
    a = torch.load(Path(reference.url) / "final.pt", weights_only=True)
    b = torch.load(out_dir / "final.pt", weights_only=True)
    for part in ("state_dict", "state_dict_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_non_finite_steps_are_skipped_then_stop_the_stage():
    model = PixArt(input_size=8, depth=1, hidden_size=48, num_heads=3, caption_channels=32, model_max_length=16)
    config = TrainConfig(steps=10, global_batch_size=2, optimizer=OPT, max_consecutive_nonfinite=3)
    trainer = Trainer(model, config)
    good = {"x": torch.randn(2, 4, 8, 8), "y": torch.randn(2, 16, 32), "mask": torch.ones(2, 16)}
    bad = {**good, "x": torch.full((2, 4, 8, 8), float("nan"))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert trainer.train_step(bad).skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing updated
    assert not trainer.train_step(good).skipped and trainer.nonfinite_steps == 1
    trainer.train_step(bad)
    trainer.train_step(bad)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        trainer.train_step(bad)


def test_came_trains_and_resumes_exactly():
    # CAME (PixArt-Sigma's optimiser, the published came-pytorch): it fits a batch, and its factored second
    # moments travel in the checkpoint so a restored trainer takes the very same next steps.
    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = PixArt(input_size=8, depth=1, hidden_size=48, num_heads=3, caption_channels=32, model_max_length=16)
        optimizer = OptimizerConfig(name="came", lr=1e-3, warmup_steps=0, grad_clip=1.0, lr_scaling="none")
        return Trainer(model, TrainConfig(steps=20, global_batch_size=4, optimizer=optimizer))

    batch = {"x": torch.randn(4, 4, 8, 8), "y": torch.randn(4, 16, 32), "mask": torch.ones(4, 16)}
    first = trainer()
    assert type(first.optimizer).__name__ == "CAME"
    losses = [first.train_step(batch).mse for _ in range(12)]
    assert sum(losses[-3:]) < sum(losses[:3])  # it fits the batch
    state = first.state_dict()
    assert any("exp_avg_sq_row" in s for s in state["optimizer"]["state"].values())  # CAME's factored state
    buffer = io.BytesIO()
    torch.save(state, buffer)  # through a checkpoint file's bytes, as a restart reads it
    buffer.seek(0)
    resumed = trainer()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [first.train_step(batch).loss for _ in range(3)] == [resumed.train_step(batch).loss for _ in range(3)]


def test_v_prediction_with_logit_normal_timesteps_fits_a_batch():
    # The CPU demo's recipe: the model's prediction type sets the loss target, the config how t is drawn.
    torch.manual_seed(0)
    model = PixArt(
        input_size=8, depth=1, hidden_size=48, num_heads=3, caption_channels=32, model_max_length=16,
        prediction_type="v_prediction",
    )  # fmt: skip
    optimizer = OptimizerConfig(lr=1e-3, warmup_steps=0, grad_clip=1.0, lr_scaling="none")
    trainer = Trainer(
        model, TrainConfig(steps=20, global_batch_size=4, optimizer=optimizer, timestep_sampling="logit_normal")
    )
    assert trainer.diffusion.prediction_type == "v_prediction"
    t, _, _ = trainer._draws({}, 2000, (4, 8, 8))
    assert abs(((t >= 250) & (t < 750)).float().mean().item() - 0.7267) < 0.03  # not uniform (0.5)
    batch = {"x": torch.randn(4, 4, 8, 8), "y": torch.randn(4, 16, 32), "mask": torch.ones(4, 16)}
    losses = [trainer.train_step(batch).mse for _ in range(12)]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    from models.training.optim import lr_factor

    cosine = lr_factor(OptimizerConfig(warmup_steps=10, schedule="cosine"), total_steps=110)
    assert cosine(0) == pytest.approx(0.1 * 1.0) and cosine(9) == pytest.approx(
        1.0 * math.cos(math.pi * 9 / 110) / 2 + 0.5
    )
    assert cosine(55) == pytest.approx(0.5) and cosine(110) == pytest.approx(0.0, abs=1e-12)
    assert cosine(200) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    constant = lr_factor(OptimizerConfig(warmup_steps=10), total_steps=110)
    assert [constant(s) for s in (0, 9, 55, 110)] == [0.1, 1.0, 1.0, 1.0]
