"""Feature storage: our feature shards vs the reference layout, in bytes per sample and samples read per second.

Reference (PixArt-alpha tools/extract_features.py): per image, one `np.savez_compressed` of `caption_feature`
(1, 120, 4096) float32 + `attention_mask` (1, 120), and one `.npy` of the VAE's mean and std (8, h, w)
float32. Ours: shards written by `storage.features.extract_shard` itself (T5 and the VAE replaced by seeded
random stand-ins of the real sizes): KEY.t5.npy (k, 4096) float16, KEY.latent.npy (8, h, w) float16, KEY.json.

The reference's T5 values are modelled two ways (ours are the same bytes either way):
- "zero pads": random float32 on the k valid tokens, zeros on the padding, which deflate squeezes to almost
  nothing: the reference at its smallest;
- "as written": what the reference code writes: its T5Embedder runs in bfloat16 (its default) and all 120
  positions hold encoder outputs (T5 computes the padded ones too), saved as float32.

Read = T5 features padded to (120, 4096) float32 + mask + latent of every sample. Ours: the loader's path
(`iter_shard` with its sha256 check, bucketed batches of 32, `decode_batch`, which also samples the latent);
the reference: `np.load` of both files into tensors. Files are read from the page cache right after being
written, on both sides, so the figures compare decoding, not disks. Best of `--repeats` passes.

    python benchmarks/feature_storage.py                  # 200 samples per configuration (~1.5 min, 2 cores)
    python benchmarks/feature_storage.py --samples 50 --as-written 20
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from storage.artifacts import ArtifactStore
from storage.features import extract_shard
from storage.loader import batch_by_bucket, decode_batch
from storage.shards import ShardInfo, iter_shard, write_shard

T5_CHANNELS, T5_LENGTH = 4096, 120
CAPTIONS = {"dense": (60, 120), "short": (15, 30)}  # T5 tokens (EOS included): LLaVA descriptions vs prompts
RESOLUTIONS = {256: (4, 32, 32), 512: (4, 64, 64)}  # image side -> SD VAE latent (C, h, w)
TARGET_BYTES, TARGET_SPEEDUP = 0.35, 5.0


# ---------------------------------------------------------------------------------------------------
#                                     Seeded stand-ins for T5 and the VAE
# ---------------------------------------------------------------------------------------------------


def t5_outputs(n: int, tokens: tuple[int, int], seed: int, as_written: bool) -> tuple[list[np.ndarray], list[int]]:
    """n (120, 4096) float32 feature tables and their valid lengths k (see the module docstring)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens[0], tokens[1] + 1, n).tolist()
    tables = []
    for k in lengths:
        table = rng.standard_normal((T5_LENGTH, T5_CHANNELS), dtype=np.float32) * 0.2
        if as_written:
            table = torch.from_numpy(table).bfloat16().float().numpy()
        else:
            table[k:] = 0
        tables.append(table)
    return tables, lengths


def vae_outputs(n: int, shape: tuple[int, int, int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (mean, std) pairs shaped like the SD VAE's unscaled posterior (mean ~ 5, std ~ 0.01)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(shape, dtype=np.float32) * 5, np.exp(rng.normal(-4.5, 0.5, shape)).astype(np.float32))
        for _ in range(n)
    ]


class RandomT5:
    """Hands out the given T5 outputs in order, through `T5TextEncoder.encode`'s interface."""

    d_model, max_length = T5_CHANNELS, T5_LENGTH

    def __init__(self, tables: list[np.ndarray], lengths: list[int]):
        self.items = iter(zip(tables, lengths, strict=True))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tables, lengths = zip(*(next(self.items) for _ in prompts), strict=True)
        mask = torch.arange(T5_LENGTH)[None] < torch.tensor(lengths)[:, None]  # (N, L)
        return torch.from_numpy(np.stack(tables)), mask.long()  # (N, L, C), (N, L)


class RandomVAE:
    """Hands out the given (mean, std) in order, through `VAE.encode`'s interface (8x downsampling)."""

    scaling_factor, downsample_factor, latent_channels, device = 0.18215, 8, 4, torch.device("cpu")

    def __init__(self, posteriors: list[tuple[np.ndarray, np.ndarray]]):
        self.items = iter(posteriors)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = zip(*(next(self.items) for _ in images), strict=True)
        return torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(stds))  # (N, C, h, w) each


# ---------------------------------------------------------------------------------------------------
#                                     Writing and reading both layouts
# ---------------------------------------------------------------------------------------------------


def image_shard(url: str, n: int):
    """n square image samples (bucket 1.0) of one tiny JPEG: extraction resizes it to the resolution."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 200)).save(buf, format="JPEG")
    samples = (
        {
            "__key__": f"img_{i:06d}",
            "jpg": buf.getvalue(),
            "txt": "",
            "json": {"height": 8, "width": 8, "bucket": "1.0"},
        }
        for i in range(n)
    )
    return write_shard(url, samples)


def write_reference_t5(path: str, table: np.ndarray, k: int) -> int:
    mask = (np.arange(T5_LENGTH) < k).astype(np.int64)[None]  # (1, L)
    np.savez_compressed(path, caption_feature=table[None], attention_mask=mask)
    return Path(path).stat().st_size


def write_reference_latent(path: str, mean: np.ndarray, std: np.ndarray) -> int:
    np.save(path, np.concatenate([mean, std]))  # (8, h, w) float32
    return Path(path).stat().st_size


def read_reference(t5_paths: list[str], latent_paths: list[str]) -> None:
    for t5_path, latent_path in zip(t5_paths, latent_paths, strict=True):
        with np.load(t5_path) as z:
            torch.from_numpy(z["caption_feature"]), torch.from_numpy(z["attention_mask"])
        torch.from_numpy(np.load(latent_path))


def read_ours(url: str, info: ShardInfo | None) -> None:
    """The loader's path; without `info` the shard's sha256 is not checked first."""
    for bucket, batch in batch_by_bucket(iter_shard(url, info), 32):
        decode_batch(bucket, batch, seed=0, epoch=0)


def samples_per_second(n: int, read, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return n / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="samples per configuration")
    parser.add_argument("--as-written", type=int, default=50, help="samples of the slower 'as written' reference")
    parser.add_argument("--repeats", type=int, default=2, help="read passes; the best counts")
    args = parser.parse_args()
    n, m = args.samples, min(args.as_written, args.samples)

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(2) as pool:
        store = ArtifactStore(str(Path(tmp) / "store"))
        ref = Path(tmp) / "reference"
        ref.mkdir()
        images = image_shard(str(Path(tmp) / "images.tar"), n)
        latents = {res: vae_outputs(n, shape, seed=res) for res, shape in RESOLUTIONS.items()}
        latent_paths = {res: [str(ref / f"{i:06d}_{res}.npy") for i in range(n)] for res in RESOLUTIONS}
        latent_bytes = {
            res: list(pool.map(write_reference_latent, latent_paths[res], *zip(*latents[res], strict=True)))
            for res in RESOLUTIONS
        }
        for c, (caption, tokens) in enumerate(CAPTIONS.items()):
            # 1. The reference's T5 files, both models of their values
            tables, lengths = t5_outputs(n, tokens, seed=c, as_written=False)
            written, written_lengths = t5_outputs(m, tokens, seed=c, as_written=True)
            zero_paths = [str(ref / f"{caption}_{i:06d}.npz") for i in range(n)]
            written_paths = [str(ref / f"{caption}_{i:06d}_written.npz") for i in range(m)]
            zero_bytes = list(pool.map(write_reference_t5, zero_paths, tables, lengths))
            written_bytes = list(pool.map(write_reference_t5, written_paths, written, written_lengths))

            for res in RESOLUTIONS:
                # 2. Our shard, written by the extraction code
                art = store.artifact("features", {"caption": caption, "res": res})
                info = extract_shard(
                    str(Path(tmp) / "images.tar"),
                    images,
                    art,
                    "000000.tar",
                    RandomT5(tables, lengths),
                    RandomVAE(latents[res]),
                    base_resolution=res,
                )
                url = art.shard_url(info.name)

                # 3. Read both
                ours = samples_per_second(n, lambda url=url, info=info: read_ours(url, info), args.repeats)
                unchecked = samples_per_second(n, lambda url=url: read_ours(url, None), args.repeats)
                ref_zero = samples_per_second(
                    n, lambda res=res, p=zero_paths: read_reference(p, latent_paths[res]), args.repeats
                )
                ref_written = samples_per_second(
                    m, lambda res=res, p=written_paths: read_reference(p, latent_paths[res][:m]), args.repeats
                )
                rows.append(
                    {
                        "captions": f"{caption} {tokens[0]}-{tokens[1]}",
                        "res": res,
                        "ours_bytes": info.bytes / n,
                        "zero_bytes": np.mean(zero_bytes) + np.mean(latent_bytes[res]),
                        "written_bytes": np.mean(written_bytes) + np.mean(latent_bytes[res][:m]),
                        "ours_read": ours,
                        "unchecked_read": unchecked,
                        "zero_read": ref_zero,
                        "written_read": ref_written,
                    }
                )

    # 4. Report
    print(f"{n} samples per configuration ('as written' reference: {m}); T5 {T5_CHANNELS} channels; best of "
          f"{args.repeats} reads, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"targets: bytes <= {TARGET_BYTES}x the reference, reads >= {TARGET_SPEEDUP}x its samples/s\n")
    header = (
        f"{'captions':<16}{'px':>5} | {'ours KB':>8} {'ref0 KB':>8} {'ratio':>6} {'refW KB':>8} {'ratio':>6} | "
        f"{'ours/s':>7} {'ref0/s':>7} {'x':>6} {'refW/s':>7} {'x':>6} | {'unchecked/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ours, zero, written = r["ours_bytes"], r["zero_bytes"], r["written_bytes"]
        reads = f"{r['ours_read']:>7.0f} {r['zero_read']:>7.0f} {r['ours_read'] / r['zero_read']:>6.1f} "
        reads += f"{r['written_read']:>7.0f} {r['ours_read'] / r['written_read']:>6.1f}"
        print(
            f"{r['captions']:<16}{r['res']:>5} | {ours / 1e3:>8.0f} {zero / 1e3:>8.0f} {ours / zero:>6.2f} "
            f"{written / 1e3:>8.0f} {ours / written:>6.2f} | {reads} | {r['unchecked_read']:>11.0f}"
        )
    print("\nref0: the reference with zero padding (float32); refW: the reference as its code writes it (bf16 T5, all "
          "120 positions). KB: 1000 bytes per sample, T5 + latent. ours/s: the loader's path (best of 2 reads; "
          "a shard's sha256 is checked on its first read in a process); unchecked/s: no check.")  # fmt: skip


if __name__ == "__main__":
    main()
