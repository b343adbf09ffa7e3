"""One training step (forward + backward + AdamW) of our PixArt vs diffusers' PixArtTransformer2DModel.

Same config, same weights (converted exactly), same batch; the two steps are interleaved in one process so
that machine noise hits both alike. Prints median step times, their ratio and the peak memory of a step
(in a fresh child process per implementation: peak RSS during steps above the resident model and optimiser).

    python benchmarks/model_step.py                 # both configurations of the issue
    python benchmarks/model_step.py --steps 5 --configs a
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import statistics
import threading
import time

import torch

from models.convert_pixart import pixart_to_diffusers
from models.pixart import PixArt

CONFIGS = {
    "a": dict(depth=6, hidden_size=192, num_heads=3),
    "b": dict(depth=12, hidden_size=384, num_heads=6),
}


def build(config: str, caption_channels: int, seed: int = 0):
    torch.manual_seed(seed)
    ours = PixArt(input_size=16, patch_size=2, caption_channels=caption_channels, **CONFIGS[config]).train()
    ours.y_embedder.uncond_prob = 0.0  # diffusers' model has no caption dropout: keep the work identical
    theirs = pixart_to_diffusers(ours).train()
    return ours, theirs


def batch(n: int, caption_channels: int, seed: int = 1):
    """Latents (N, 4, 16, 16), timesteps, T5-like features (N, 120, C) with realistic caption lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randn(n, 120, caption_channels, generator=g)
    lengths = torch.randint(8, 64, (n,), generator=g)  # dense captions, padded to 120 tokens
    mask = (torch.arange(120)[None] < lengths[:, None]).long()
    target = torch.randn(n, 8, 16, 16, generator=g)
    return x, t, y, mask, target


def step_fn(model, opt, is_ours: bool, data):
    x, t, y, mask, target = data

    def step():
        opt.zero_grad(set_to_none=True)
        if is_ours:
            out = model(x, t, y, mask)
        else:
            out = model(
                x,
                encoder_hidden_states=y,
                timestep=t,
                encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()

    return step


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_child(config: str, caption_channels: int, n: int, which: str, queue):
    """Peak RSS above the resident model + optimiser state, sampled every millisecond during 3 steps."""
    models = dict(zip(("ours", "diffusers"), build(config, caption_channels), strict=True))
    model = models.pop(which)
    models.clear()  # only the measured model stays alive
    gc.collect()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = step_fn(model, opt, which == "ours", batch(n, caption_channels))
    step()  # optimiser state allocated
    base, peak, done = rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(3):
        step()
    done.set()
    sampler.join()
    queue.put(peak[0] - base)


def peak_memory(config: str, caption_channels: int, n: int, which: str) -> float:
    # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so RSS follows live memory.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=peak_memory_child, args=(config, caption_channels, n, which, queue))
    proc.start()
    mib = queue.get()
    proc.join()
    return mib


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="ab", help="which configurations: a (depth 6 / 192), b (12 / 384)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--caption-channels", type=int, default=4096, help="T5 width (4096 for T5 v1.1 XXL)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, 16x16 latents, 120 text tokens")
    for config in args.configs:
        ours, theirs = build(config, args.caption_channels)
        data = batch(args.batch, args.caption_channels)
        steps = {
            "ours": step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), True, data),
            "diffusers": step_fn(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4), False, data),
        }
        times = {k: [] for k in steps}
        for step in steps.values():  # warm-up
            step()
        for _ in range(args.steps):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: peak_memory(config, args.caption_channels, args.batch, k) for k in steps}
        cfg = CONFIGS[config]
        print(
            f"[{config}] depth {cfg['depth']} / hidden {cfg['hidden_size']}: "
            f"ours {med['ours']:.3f} s/step, diffusers {med['diffusers']:.3f} s/step, "
            f"ratio {med['ours'] / med['diffusers']:.2f}x (target <= 0.80); "
            f"peak step memory ours {mem['ours']:.0f} MiB, diffusers {mem['diffusers']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
