"""Training throughput of the demo recipe: a plain loop vs Ray Train with 1 and 2 workers.

Steady-state samples/s is the median over the steps after a warm-up, read from each run's metrics (so
Ray's start-up is reported apart, as wall time). Each worker gets one CPU thread (Ray's default
OMP_NUM_THREADS=1 for a 1-CPU worker), and so does the plain loop, so the overhead is Ray Train's alone.

    python benchmarks/train_throughput.py [--model PixArt-T/2] [--steps 60] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from models.pixel_codec import PixelCodec
from models.stages import StageModelConfig
from models.text_encoder import T5TextEncoder
from models.tiny import build_tiny_components
from models.training.config import OptimizerConfig, TrainConfig
from storage.artifacts import ArtifactStore
from storage.features import extract_features
from storage.ingest import ingest
from storage.loader import LoaderConfig
from storage.sources.shapes import ShapesConfig, ShapesSource
from tasks.ray_train import StageRunConfig, run_stage


def features(root: Path, count: int, factor: int):
    store = ArtifactStore(str(root / "store"))
    tiny = build_tiny_components(root / "tiny")
    shapes = ShapesConfig(count=count, image_size=32)
    images = store.artifact("ingest", {"shapes": shapes.model_dump()})
    ingest(ShapesSource(shapes), images, samples_per_shard=64, progress=False)
    feats = store.artifact("features", {"codec": "pixel"}, upstream=[images.id])
    t5 = T5TextEncoder.from_pretrained(tiny.t5_dir)
    extract_features(images, feats, t5, PixelCodec(factor=factor), base_resolution=32, progress=False)
    return store, feats


def measure(store, feats, args, name: str, workers: int, use_ray: bool) -> dict:
    steps, batch = args.steps, args.batch
    config = StageRunConfig(
        model=StageModelConfig(
            stage=2,
            model=args.model,
            input_size=32 // args.pixel_factor,
            in_channels=3 * args.pixel_factor**2,
            caption_channels=32,
        ),
        train=TrainConfig(
            steps=steps,
            global_batch_size=batch,
            checkpoint_every=steps,
            optimizer=OptimizerConfig(lr=1e-4, warmup_steps=10, grad_clip=1.0, lr_scaling="none"),
        ),
        loader=LoaderConfig(num_workers=0, shuffle_buffer=64, split="batches"),
        num_workers=workers,
        use_ray=use_ray,
    )
    out = store.artifact(name, config.model_dump(), upstream=[feats.id])
    start = time.perf_counter()
    run_stage(config, feats, out)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(out.url) / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["samples_per_s"] for r in rows[args.warmup :])
    return {"run": name, "workers": workers, "samples_per_s": rate, "wall_s": wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="PixArt-T/2", help="size preset (the demo recipe trains PixArt-T/2)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (split over the workers)")
    parser.add_argument("--pixel-factor", type=int, default=2, help="pixel codec factor (the demo uses 2)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        store, feats = features(Path(tmp), count=512, factor=args.pixel_factor)
        plain = measure(store, feats, args, "plain", 1, False)
        one = measure(store, feats, args, "ray1", 1, True)
        two = measure(store, feats, args, "ray2", 2, True)
    side, channels = 32 // args.pixel_factor, 3 * args.pixel_factor**2
    print(
        f"stage 2, {args.model}, {side}x{side}x{channels} latents, global batch {args.batch};"
        f" median of steps {args.warmup}+:"
    )
    for r in (plain, one, two):
        print(
            f"  {r['run']:<6} workers={r['workers']}  {r['samples_per_s']:8.1f} samples/s   wall {r['wall_s']:6.1f} s"
        )
    overhead = 1 - one["samples_per_s"] / plain["samples_per_s"]
    efficiency = two["samples_per_s"] / (2 * one["samples_per_s"])
    print(f"Ray Train overhead (1 worker vs plain loop): {overhead:+.1%}  (target <= 10%)")
    print(f"2-worker scaling efficiency: {efficiency:.0%}  (2 workers / 2 x 1 worker)")
    print(f"Ray start-up and teardown per run: {one['wall_s'] - plain['wall_s']:.1f} s (wall, not in samples/s)")


if __name__ == "__main__":
    main()
