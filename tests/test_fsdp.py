"""FSDP stage training: 2 Ray Train workers (gloo, CPU) sharding a tiny PixArt per block, against 1 process.

Checkpoints hold full (gathered) state in one layout, so an FSDP run resumes from a 1-process checkpoint and
the other way round; both are tested below.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from test_training import data, losses, stage_run  # noqa: F401 (data: the module's feature shards fixture)

from models.pixart import PixArt
from models.pixart_checkpoint import load_pixart
from models.training.config import OptimizerConfig, TrainConfig
from models.training.trainer import Trainer
from tasks.ray_train import load_stage_checkpoint, run_stage

STEPS, RESUME_AT = 5, 3  # stage_run checkpoints every 3 steps
# Same per-sample data, noise and timesteps; only the float order of the gradient reduction differs.
TOL = {"atol": 1e-4, "rtol": 1e-4}


def fsdp_run(steps: int = STEPS, **overrides):
    return stage_run(2, steps=steps, use_ray=True, num_workers=2, parallel_strategy="fsdp", **overrides)


def train(store, features, config, name, resume_from: Path | None = None, tiny=None):
    """run_stage into a new artifact; with resume_from (a step directory of another run), that checkpoint and
    the run's metrics (marked "copied") are on disk first, so the stage resumes from it as after a crash."""
    out = store.artifact(name, config.model_dump(), upstream=[features.id])
    if resume_from is not None:
        out_dir = Path(out.url)
        shutil.copytree(resume_from, out_dir / "checkpoints" / resume_from.name)
        rows = [json.loads(line) for line in (resume_from.parents[1] / "metrics.jsonl").read_text().splitlines()]
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "copied": True}) + "\n" for r in rows))
    text_encoder = str(tiny.t5_dir) if tiny else None
    outputs = run_stage(config, features, out, text_encoder=text_encoder, codec={"kind": "pixel", "factor": 4})
    return out, outputs


def checkpoint(out, step: int) -> Path:
    return Path(out.url) / "checkpoints" / f"step_{step:08d}"


def steps_trained(out) -> list[int]:
    """Steps this run trained itself: a run that resumed keeps the copied rows up to its checkpoint."""
    rows = [json.loads(line) for line in (Path(out.url) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if not r.get("copied")]


@pytest.fixture(scope="module")
def single(data):  # noqa: F811
    store, features = data
    return train(store, features, stage_run(2, steps=STEPS), "stage2")[0]


@pytest.fixture(scope="module")
def sharded(data, ray_local, tiny):  # noqa: F811
    """The FSDP run, with sample grids (rank 0 samples from the gathered EMA) at step 3 and at the end."""
    store, features = data
    return train(store, features, fsdp_run(sample_every=RESUME_AT), "stage2_fsdp", tiny=tiny)


@pytest.mark.slow
def test_fsdp_workers_follow_the_single_process_trajectory(single, sharded):
    out, _ = sharded
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)), **TOL)
    a = torch.load(Path(single.url) / "final.pt", weights_only=True)
    b = torch.load(Path(out.url) / "final.pt", weights_only=True)
    for part in ("state_dict", "state_dict_ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=1e-4, rtol=1e-3, msg=f"{part} {k}")


@pytest.mark.slow
def test_fsdp_outputs_have_the_single_process_layout(single, sharded):
    out, outputs = sharded
    a = torch.load(Path(single.url) / "final.pt", weights_only=True)
    b = torch.load(outputs["final"], weights_only=True)
    assert b["model_config"] == a["model_config"]
    for part in ("state_dict", "state_dict_ema"):
        assert list(b[part]) == list(a[part])  # official key layout, no FSDP prefixes
        assert all(type(v) is torch.Tensor and v.shape == a[part][k].shape for k, v in b[part].items())

    # final.pt, ema.pth and the diffusers export load into plain models
    model = load_stage_checkpoint(outputs["final"])
    assert isinstance(model, PixArt) and model.state_dict().keys() == a["state_dict"].keys()
    ema = load_pixart(outputs["ema"])
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, b["state_dict_ema"][k], atol=0, rtol=0)
    assert isinstance(PixArtTransformer2DModel.from_pretrained(outputs["diffusers"]), PixArtTransformer2DModel)
    assert [Path(p).name for p in outputs["grids"]] == ["step_00000003.png", "step_00000005.png"]

    # the checkpoint's optimiser state is indexed like a single process's, with full (gathered) tensors
    sa = torch.load(checkpoint(single, STEPS) / "state.pt", weights_only=True)["optimizer"]
    sb = torch.load(checkpoint(out, STEPS) / "state.pt", weights_only=True)["optimizer"]
    assert [g["params"] for g in sb["param_groups"]] == [g["params"] for g in sa["param_groups"]]
    for i, state in sa["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(sb["state"][i][name], value, atol=1e-4, rtol=1e-3, msg=f"{i} {name}")


@pytest.mark.slow
def test_fsdp_run_resumes_like_an_uninterrupted_one(data, sharded):  # noqa: F811
    """Restart at the step-3 checkpoint (gathered, then re-sharded): steps 4 and 5 as without the restart."""
    store, features = data
    out, _ = sharded
    resumed, _ = train(store, features, fsdp_run(), "stage2_fsdp_resumed", resume_from=checkpoint(out, RESUME_AT))
    assert steps_trained(resumed) == [4, 5]
    assert losses(resumed) == losses(out)  # bit for bit: the same sharded arithmetic from the same state
    a = torch.load(Path(out.url) / "final.pt", weights_only=True)
    b = torch.load(Path(resumed.url) / "final.pt", weights_only=True)
    for part in ("state_dict", "state_dict_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.slow
def test_checkpoints_move_between_fsdp_and_one_process(data, single, sharded, ray_local):  # noqa: F811
    """1 process resumes from FSDP's step-3 checkpoint, FSDP from the 1-process one; both follow the
    uninterrupted runs (which agree with each other within TOL)."""
    store, features = data
    out, _ = sharded
    config = stage_run(2, steps=STEPS)
    from_fsdp, _ = train(store, features, config, "stage2_from_fsdp", resume_from=checkpoint(out, RESUME_AT))
    from_single, _ = train(store, features, fsdp_run(), "stage2_fsdp_from_single", checkpoint(single, RESUME_AT))
    for resumed in (from_fsdp, from_single):
        assert steps_trained(resumed) == [4, 5]
        torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(single)), **TOL)


def test_fp16_skipped_steps_back_off_the_scale_without_an_inf_check():
    """Under FSDP a rank's own inf check sees only its shards, so a skipped step backs the loss scale off
    explicitly (the same on every rank); this also holds when the loss itself is NaN (no backward at all)."""
    model = PixArt(input_size=8, depth=1, hidden_size=48, num_heads=3, caption_channels=32, model_max_length=16)
    config = TrainConfig(steps=4, global_batch_size=2, mixed_precision="fp16", optimizer=OptimizerConfig(grad_clip=1))
    trainer = Trainer(model, config)
    good = {"x": torch.randn(2, 4, 8, 8), "y": torch.randn(2, 16, 32), "mask": torch.ones(2, 16)}
    bad = {**good, "x": torch.full((2, 4, 8, 8), float("nan"))}
    initial = trainer.scaler.get_scale()
    assert trainer.train_step(bad).skipped and trainer.scaler.get_scale() == initial / 2
    assert not trainer.train_step(good).skipped
    assert trainer.train_step(bad).skipped and trainer.scaler.get_scale() == initial / 4
