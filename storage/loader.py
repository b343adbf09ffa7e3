"""The training data pipeline: feature shards -> batches of one aspect-ratio bucket, deterministic and resumable.

Epoch e on rank r of R, with W DataLoader workers (W "lanes"; one lane without workers):
1. shards: the feature shards shuffled by (seed, e); rank r takes every R-th one from the r-th, and lane l
   every W-th of those from the l-th, so each shard is read once per epoch by one lane of one rank;
2. each lane reads its shards in turn, each checked against its manifest record first (size, sha256): a
   damaged shard raises ShardError naming it and is never trained on;
3. samples are shuffled in a buffer seeded by (seed, e, r, l);
4. bucketed batching: a sample joins its bucket's open batch, which is emitted when full; when the lane's
   shards are done the partial batches follow (or are dropped, `drop_last`);
5. decoding: T5 features padded back to (L, C) with their mask; latents drawn afresh each epoch,
   x = (mean + std * eps) * scaling_factor with eps seeded by (seed, e, key), or the pixel codec's exact
   mean taken as is (times its scaling factor); class labels; PixArtMS's micro-conditions.

A rank's batches come from its lanes in turn, skipping lanes that have run out: the order in which
PyTorch's DataLoader returns an IterableDataset's batches from its workers. So `LoaderState` (epoch,
batches taken from each lane, the lane due next) is an exact position: a loader built with it rebuilds each
lane, skips the batches it already gave before decoding them, and assigns lanes to workers rotated so that
the DataLoader's turn-taking resumes where it stopped. Resumed, it yields exactly the batches an
uninterrupted run would have yielded next; the same seed, world size and num_workers give the same order.
Shards and buckets do not divide evenly, so ranks may differ by a few batches per epoch: under DDP, leave
`epochs=None` (endless) and train for a number of steps, saving each rank's state.

A batch (B = batch_size, or fewer for the last batch of a bucket in a lane's epoch, unless drop_last):

    x             (B, C, h, w)   float32  scaled latents, what the diffusion model is trained on
    y             (B, L, C_text) float32  T5 features (L = 120), zero beyond each caption's tokens
    mask          (B, L)         int64    1 on each caption's tokens (EOS included), 0 on padding
    cls           (B,)           int64    class label, -1 where the sample has none
    img_hw        (B, 2)         float32  the image's original (height, width): PixArtMS's size condition
    aspect_ratio  (B, 1)         float32  the bucket's ratio h / w: PixArtMS's ratio condition
    keys          list[str]               the samples' keys
    bucket        str                     the aspect-ratio bucket all B samples share

so that `model(batch["x"], t, batch["y"], batch["mask"], data_info={k: batch[k] for k in ("img_hw",
"aspect_ratio")})`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.artifacts import Artifact
from storage.shards import ShardError, ShardInfo, ShardMissing, iter_shard, load_npy

FeatureShard = tuple[str, ShardInfo]  # (url, manifest record)


class LoaderConfig(BaseModel):
    """How feature shards become batches; the same values give the same batches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(32, ge=1, description="samples per batch on each rank (the global batch is x world size)")
    seed: int = Field(0, description="seeds shard order, sample shuffling and latent noise, per epoch")
    shuffle_buffer: int = Field(
        256, ge=1, description="samples each worker holds for shuffling (undecoded: ~0.75 MB each for T5-XXL)"
    )
    drop_last: bool = Field(False, description="drop each bucket's partial batch at the end of an epoch")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0: in the main process)")
    epochs: int | None = Field(None, ge=1, description="stop after this many epochs; None: endless")
    pin_memory: bool = Field(False, description="page-locked batches, for faster copies to a CUDA device")
    start_method: Literal["spawn", "forkserver", "fork"] = Field(
        "spawn",
        description="how DataLoader workers start; spawn by default: a process that already runs Ray, Prefect or "
        "gloo threads cannot be forked safely (forked workers die at start)",
    )
    split: Literal["shards", "batches"] = Field(
        "shards",
        description="shards: each rank reads its own shards (scales); batches: every rank reads all shards, builds "
        "the same global batches and takes its slice, so N ranks see exactly the batches of one process (exact "
        "DDP equivalence, at N times the reading; partial global batches are dropped)",
    )


@dataclass(frozen=True)
class LoaderState:
    """A rank's position: within `epoch`, `lane_batches[l]` batches taken from lane l, lane `next_lane` due next.

    Save `loader.state_dict()` with the checkpoint (one per rank) and pass it back to `build_loader`.
    """

    epoch: int = 0
    lane_batches: tuple[int, ...] = ()  # empty: nothing taken yet
    next_lane: int = 0

    @property
    def batches(self) -> int:
        """Batches this rank has taken in `epoch`."""
        return sum(self.lane_batches)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "lane_batches": list(self.lane_batches), "next_lane": self.next_lane}

    @classmethod
    def from_dict(cls, state: dict) -> LoaderState:
        return cls(int(state["epoch"]), tuple(int(n) for n in state["lane_batches"]), int(state["next_lane"]))


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings): stable across processes and Python versions."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------------
#                                     Pipeline stages
# ---------------------------------------------------------------------------------------------------


def lane_shards(
    shards: Sequence[FeatureShard], seed: int, epoch: int, rank: int, world_size: int, lane: int, lanes: int
) -> list[FeatureShard]:
    """The shards lane `lane` of rank `rank` reads in `epoch`, in reading order."""
    order = list(shards)
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    return order[rank::world_size][lane::lanes]


def read_shards(shards: Iterable[FeatureShard]) -> Iterator[dict]:
    """Raw samples of each shard in turn, each shard verified against its record before it is read."""
    for url, info in shards:
        try:
            yield from iter_shard(url, info)
        except ShardMissing as err:
            raise ShardMissing(
                f"{err}: the feature artifact records it, so if the file exists this process cannot see it (a "
                "workdir on a disk this node does not share: use shared storage or a URL); if it was deleted, "
                "re-run feature extraction"
            ) from err
        except ShardError as err:
            raise ShardError(
                f"{err}: this feature shard is damaged and will not be trained on; re-run feature extraction "
                "to rewrite it"
            ) from err


def batch_by_bucket(
    samples: Iterable[dict], batch_size: int, drop_last: bool = False
) -> Iterator[tuple[str, list[dict]]]:
    """(bucket, samples) batches of one aspect-ratio bucket each, from samples whose json names their bucket.

    A batch is emitted as soon as its bucket holds `batch_size` samples; at the end the partial batches
    follow in the order their buckets first appeared, unless `drop_last`.
    """
    pending: dict[str, list[dict]] = {}
    for sample in samples:
        bucket = json.loads(sample["json"])["bucket"]
        group = pending.setdefault(bucket, [])
        group.append(sample)
        if len(group) == batch_size:
            yield bucket, pending.pop(bucket)
    if not drop_last:
        yield from pending.items()


def sample_latent(stored: np.ndarray, meta: dict, seed: int, epoch: int) -> torch.Tensor:
    """A stored latent (see storage.features) -> the scaled latent (C, h, w) the model trains on this epoch."""
    latent = torch.from_numpy(stored.astype(np.float32))  # a writable float32 copy of the fp16 view
    if meta["latent_layout"] == "mean":
        return latent * meta["scaling_factor"]
    if meta["latent_layout"] != "mean_std":
        raise ValueError(
            f"sample {meta['key']}: latent_layout={meta['latent_layout']!r}; expected 'mean' or 'mean_std'"
        )
    mean, std = latent.chunk(2)  # (C, h, w) each
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, meta["key"]))
    eps = torch.randn(mean.shape, generator=generator)
    return (mean + std * eps) * meta["scaling_factor"]


def decode_batch(bucket: str, samples: list[dict], seed: int, epoch: int) -> dict:
    """Raw feature samples of one bucket -> the batch dict of the module docstring."""
    metas = [json.loads(s["json"]) for s in samples]
    tokens = [load_npy(s["t5.npy"]) for s in samples]  # (k_i, C_text) float16 each
    n, length = len(samples), metas[0]["t5_length"]
    # np.zeros maps zero pages lazily and numpy casts fp16 -> fp32 straight into place: one pass per token
    y = np.zeros((n, length, tokens[0].shape[1]), dtype=np.float32)  # (B, L, C_text)
    mask = torch.zeros(n, length, dtype=torch.int64)  # (B, L)
    for i, t in enumerate(tokens):
        y[i, : len(t)] = t
        mask[i, : len(t)] = 1
    latents = [sample_latent(load_npy(s["latent.npy"]), m, seed, epoch) for s, m in zip(samples, metas, strict=True)]
    return {
        "x": torch.stack(latents),  # (B, C, h, w)
        "y": torch.from_numpy(y),
        "mask": mask,
        "cls": torch.tensor([int(s["cls"]) if "cls" in s else -1 for s in samples]),  # (B,)
        "img_hw": torch.tensor([[m["orig_height"], m["orig_width"]] for m in metas], dtype=torch.float32),  # (B, 2)
        "aspect_ratio": torch.full((n, 1), float(bucket)),  # (B, 1)
        "keys": [s["__key__"] for s in samples],
        "bucket": bucket,
    }


class EpochBatches(IterableDataset):
    """One epoch of one rank from `state` on; each DataLoader worker plays one lane, rotated by `next_lane`."""

    def __init__(
        self,
        shards: Sequence[FeatureShard],
        config: LoaderConfig,
        rank: int,
        world_size: int,
        state: LoaderState,
        keep_keys: frozenset[str] | None = None,
    ):
        self.shards, self.config, self.rank, self.world_size, self.state = shards, config, rank, world_size, state
        self.keep_keys = keep_keys

    def __iter__(self) -> Iterator[dict]:
        config, epoch = self.config, self.state.epoch
        lanes = max(1, config.num_workers)
        worker = get_worker_info()
        lane = (self.state.next_lane + (worker.id if worker else 0)) % lanes
        by_batch = config.split == "batches"
        # "batches": every rank reads what a single process would read, then keeps its slice of each batch
        rank, world = (0, 1) if by_batch else (self.rank, self.world_size)
        shards = lane_shards(self.shards, config.seed, epoch, rank, world, lane, lanes)
        rng = random.Random(derive_seed(config.seed, epoch, rank, lane))
        size = config.batch_size * (self.world_size if by_batch else 1)
        keep = self.keep_keys
        pipeline = wds.DataPipeline(
            lambda: iter(shards),
            read_shards,
            lambda samples: (s for s in samples if keep is None or s["__key__"] in keep),  # a stage's subset
            wds.shuffle(config.shuffle_buffer, initial=config.shuffle_buffer, rng=rng),
            lambda samples: batch_by_bucket(samples, size, config.drop_last or by_batch),
            lambda batches: islice(batches, self.state.lane_batches[lane], None),  # taken before a resume
            lambda batches: (self._slice(b) if by_batch else b for b in batches),
            lambda batches: ({**decode_batch(*b, config.seed, epoch), "lane": lane} for b in batches),
        )
        return iter(pipeline)

    def _slice(self, batch: tuple[str, list[dict]]) -> tuple[str, list[dict]]:
        """This rank's part of a global batch (split="batches")."""
        bucket, samples = batch
        b = self.config.batch_size
        return bucket, samples[self.rank * b : (self.rank + 1) * b]


# ---------------------------------------------------------------------------------------------------
#                                     The loader
# ---------------------------------------------------------------------------------------------------


class FeatureLoader:
    """Iterable of batch dicts for one rank; `state` is its position after the last batch it yielded."""

    def __init__(
        self,
        shards: Sequence[FeatureShard],
        config: LoaderConfig,
        rank: int,
        world_size: int,
        state: LoaderState,
        keep_keys: frozenset[str] | None = None,
    ):
        self.shards, self.config, self.rank, self.world_size, self.state = shards, config, rank, world_size, state
        self.keep_keys = keep_keys

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def __iter__(self) -> Iterator[dict]:
        config, lanes = self.config, max(1, self.config.num_workers)
        while config.epochs is None or self.state.epoch < config.epochs:
            start = self.state
            epoch = EpochBatches(self.shards, config, self.rank, self.world_size, start, self.keep_keys)
            batches = (
                DataLoader(
                    epoch,
                    batch_size=None,
                    num_workers=config.num_workers,
                    pin_memory=config.pin_memory,
                    multiprocessing_context=config.start_method,
                )
                if config.num_workers
                else epoch
            )
            taken = list(start.lane_batches)
            for batch in batches:
                lane = batch.pop("lane")
                taken[lane] += 1
                self.state = LoaderState(start.epoch, tuple(taken), (lane + 1) % lanes)
                yield batch
            if sum(taken) == 0:
                raise RuntimeError(
                    f"rank {self.rank} of {self.world_size} got no batch in epoch {start.epoch} from "
                    f"{len(self.shards)} shards (batch_size={config.batch_size}, drop_last={config.drop_last})"
                )
            self.state = LoaderState(start.epoch + 1, (0,) * lanes, 0)


def feature_shards(artifact: Artifact) -> list[FeatureShard]:
    """(url, record) of every shard a complete feature artifact's manifest lists."""
    return [(artifact.shard_url(info.name), info) for info in artifact.shards()]


def build_loader(
    shards: Artifact | Sequence[FeatureShard],
    config: LoaderConfig | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    state: LoaderState | dict | None = None,
    keep_keys: Iterable[str] | None = None,
) -> FeatureLoader:
    """The training loader of one rank over a feature artifact (or explicit (url, record) pairs).

    rank / world_size: this process's data-parallel rank and the number of ranks; by default those of the
    initialised torch.distributed process group, else 0 / 1. state: a position saved from
    `loader.state_dict()` (or a LoaderState), to resume exactly there; it must come from a loader over the
    same shards with the same config (epochs aside), rank and world size.
    keep_keys: train on these samples only (e.g. stage 3's subset of the manifest).
    """
    # 1. Check inputs
    config = config or LoaderConfig()
    shards = feature_shards(shards) if isinstance(shards, Artifact) else list(shards)
    distributed = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else dist.get_rank() if distributed else 0
    world_size = world_size if world_size is not None else dist.get_world_size() if distributed else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}: expected 0 <= rank < world_size")
    if len(shards) < world_size and config.split == "shards":
        raise ValueError(
            f"{len(shards)} feature shards cannot feed world_size={world_size} ranks: every rank needs at least "
            "one shard (extract into more, smaller shards)"
        )

    # 2. Position
    lanes = max(1, config.num_workers)
    state = LoaderState.from_dict(state) if isinstance(state, dict) else state or LoaderState()
    if not state.lane_batches:
        state = LoaderState(state.epoch, (0,) * lanes, 0)
    if len(state.lane_batches) != lanes or not 0 <= state.next_lane < lanes:
        raise ValueError(
            f"loader state {state.to_dict()} was saved with {len(state.lane_batches)} lanes; this loader has "
            f"{lanes} (num_workers={config.num_workers}): resume with the num_workers the state was saved with"
        )
    keep = frozenset(keep_keys) if keep_keys is not None else None
    return FeatureLoader(shards, config, rank, world_size, state, keep)
