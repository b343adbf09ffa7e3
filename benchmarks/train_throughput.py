"""Where a step of the demo's stage 2 spends its time: a plain loop vs Ray Train, arm by arm.

Every arm trains stage 2 of configs/demo.yaml (PixArt-M/2, 16 x 16 x 12 latents, global batch 32) for --steps
steps on the same features, in this process (`plain-*`) or as a Ray Train job through `run_stage`. Inside the
loop (rank 0's, under Ray) each phase of a step is timed; per arm the table gives the mean milliseconds per step
of each phase, the median and mean step, the CPU time of the worker process per step, and Ray's start-up and
teardown around the loop (wall seconds, not in the steps).

    python benchmarks/train_throughput.py [--steps 100] [--contend 1] [--arms plain-1,ray-before,ray-2x1]

Arms: plain-1 / plain-2 (one or two torch threads), ray-before (one worker reserving 2 CPUs, so 2 threads, at
Ray's nice 15: the demo before), ray-1x2 (the same at nice 0), ray-2x1 (two single-threaded workers, DDP over
gloo, at nice 0: the demo now). --contend N runs N busy loops at nice 0 beside the arms: another job on the
machine, as on a shared one.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models.pixel_codec import PixelCodec
from models.text_encoder import T5TextEncoder
from models.tiny import build_tiny_components
from storage.artifacts import ArtifactStore
from storage.features import extract_features
from storage.ingest import ingest
from storage.sources.shapes import ShapesConfig, ShapesSource
from tasks import ray_train
from tasks.config import load_config

# arm -> (under Ray, workers, CPUs (threads) per worker, niceness)
ARMS = {
    "plain-1": (False, 1, 1, 0),
    "plain-2": (False, 1, 2, 0),
    "ray-before": (True, 1, 2, 15),
    "ray-1x2": (True, 1, 2, 0),
    "ray-2x1": (True, 2, 1, 0),
}
PHASES = ("data", "draws", "forward + loss", "backward", "clip", "optimiser", "EMA", "rest of the step", "metrics log",
          "checkpoint + report")  # fmt: skip
_train_worker = ray_train.train_worker  # the real loop, wrapped by `timed_train_worker`


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


# ---------------------------------------------------------------------------------------------------
#                               Timing inside the loop (on every worker)
# ---------------------------------------------------------------------------------------------------


def timed_train_worker(cfg: dict) -> None:
    """`train_worker` with each phase of a step timed; rank 0 writes <out>/phases.json."""
    from models.diffusion import GaussianDiffusion
    from models.training import trainer as trainer_module
    from models.training.trainer import Trainer

    totals: collections.Counter = collections.Counter()
    ticks: list[tuple[float, float]] = []  # (wall, CPU) as each step asks for its batch
    info: dict = {}
    patched: list[tuple[object, str, object]] = []

    def timed(owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - start

        patched.append((owner, name, original))
        setattr(owner, name, wrapper)

    def timed_batches(batches):
        while True:
            ticks.append((time.perf_counter(), time.process_time()))
            start = time.perf_counter()
            batch = next(batches)
            totals["data"] += time.perf_counter() - start
            yield batch

    def timed_callback(callback, phase: str):
        def wrapper(*args):
            start = time.perf_counter()
            callback(*args)
            totals[phase] += time.perf_counter() - start

        return wrapper

    fit = Trainer.fit

    def timed_fit(self, batches, until_step, on_metrics=None, on_checkpoint=None):
        info.update(rank=self.rank, threads=torch.get_num_threads(), nice=os.nice(0))
        summary = fit(self, timed_batches(batches), until_step, timed_callback(on_metrics, "metrics log"),
                      timed_callback(on_checkpoint, "checkpoint + report"))  # fmt: skip
        ticks.append((time.perf_counter(), time.process_time()))
        return summary

    patched.append((Trainer, "fit", fit))
    Trainer.fit = timed_fit
    for owner, name, phase in (
        (Trainer, "train_step", "step"),
        (Trainer, "_draws", "draws"),
        (GaussianDiffusion, "training_losses", "forward + loss"),
        (torch.Tensor, "backward", "backward"),
        (torch.nn.utils, "clip_grad_norm_", "clip"),
        (torch.amp.GradScaler, "step", "optimiser"),
        (trainer_module, "update_ema", "EMA"),
    ):
        timed(owner, name, phase)
    try:
        _train_worker(cfg)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    if info.get("rank") == 0:
        record = {**info, "totals": dict(totals), "ticks": ticks}
        Path(cfg["out_dir"], "phases.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------
#                                             Arms
# ---------------------------------------------------------------------------------------------------


def measure(store, feats, args, arm: str) -> dict:
    under_ray, workers, cpus, nice = ARMS[arm]
    stage2 = load_config("demo").stage2
    config = stage2.model_copy(
        update={
            "train": stage2.train.model_copy(update={"steps": args.steps}),
            "num_workers": workers,
            "cpus_per_worker": cpus,
            "worker_niceness": nice,
            "use_ray": under_ray,
        }
    )
    out = store.artifact(f"arm_{arm.replace('-', '_')}_{time.time_ns()}", config.model_dump(), upstream=[feats.id])
    threads = torch.get_num_threads()
    torch.set_num_threads(cpus)  # the plain arms' threads; Ray's workers set their own from cpus_per_worker
    start = time.perf_counter()
    try:
        ray_train.run_stage(config, feats, out)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - start
    record = json.loads((Path(out.url) / "phases.json").read_text())
    ticks = record["ticks"][args.warmup :]
    walls = [b[0] - a[0] for a, b in itertools.pairwise(ticks)]
    cpus_used = [b[1] - a[1] for a, b in itertools.pairwise(ticks)]
    # phases are totals over every step; scale them to a step (warm-up included: they are means)
    per_step = {phase: 1000 * seconds / args.steps for phase, seconds in record["totals"].items()}
    inner = ("draws", "forward + loss", "backward", "clip", "optimiser", "EMA")
    per_step["rest of the step"] = per_step["step"] - sum(per_step.get(p, 0.0) for p in inner)
    loop = record["ticks"][-1][0] - record["ticks"][0][0]
    return {
        "arm": arm,
        "phases": per_step,
        "median": 1000 * statistics.median(walls),
        "mean": 1000 * statistics.mean(walls),
        "cpu": 1000 * statistics.mean(cpus_used),
        "layout": f"{workers}x{record['threads']}",
        "nice": record["nice"],
        "overhead": wall - loop,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--rounds", type=int, default=1, help="run the arms this many times, interleaved")
    parser.add_argument("--contend", type=int, default=0, help="busy loops at nice 0 beside the arms")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median, mean and CPU")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"unknown arms {unknown}; expected some of {list(ARMS)}")

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the timed loop, shipped to Ray's workers
    ray_train.train_worker = timed_train_worker  # what run_stage runs, in this process or on Ray Train
    ray.init(include_dashboard=True, object_store_memory=200 * 2**20, log_to_driver=False)  # as run_stage's
    loads = [os.getloadavg()[0]]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store, feats = features(Path(tmp), count=512, factor=2)
            runs = [measure(store, feats, args, arm) for _ in range(args.rounds) for arm in arms]
    finally:
        for hog in hogs:
            hog.kill()
        loads.append(os.getloadavg()[0])
    print_table(runs, args, loads)


def print_table(runs: list[dict], args, loads: list[float]) -> None:
    print(
        f"stage 2 of configs/demo.yaml, {args.steps} steps per arm, {args.contend} busy loop(s) beside; load average "
        f"{loads[0]:.1f} before, {loads[1]:.1f} after. Milliseconds per step (phases: mean of all steps; step and "
        f"CPU: steps {args.warmup}+; CPU: rank 0's process)."
    )
    names = [r["arm"] for r in runs]
    width = max(11, *(len(n) + 2 for n in names))
    print(f"{'':<22}" + "".join(f"{n:>{width}}" for n in names))
    for phase in PHASES:
        print(f"{phase:<22}" + "".join(f"{r['phases'].get(phase, 0.0):>{width}.1f}" for r in runs))
    for key, label, fmt in (
        ("median", "step, median", ".1f"),
        ("mean", "step, mean", ".1f"),
        ("cpu", "CPU per step", ".1f"),
        ("layout", "workers x threads", ""),
        ("nice", "nice", ""),
        ("overhead", "start + teardown, s", ".1f"),
    ):
        print(f"{label:<22}" + "".join(f"{r[key]:>{width}{fmt}}" for r in runs))
    if base := next((r for r in runs if r["arm"] == "plain-2"), None):  # the same two cores, no Ray
        print(f"{'mean step / plain-2':<22}" + "".join(f"{r['mean'] / base['mean']:>{width}.2f}" for r in runs))


if __name__ == "__main__":
    main()
