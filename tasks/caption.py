"""Captioning tasks: the caption version a captioner writes, and one image shard captioned (on Ray).

See storage.captions: captions are filed by caption version and image-shard sha256, so a shard already captioned
for a version (by this run, an interrupted one, or another ingest with the same shard) is never captioned again.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

import storage.captions as captions_lib
from models.captioner import GenerationParams
from storage.captions import CaptionStore, CaptionVersion
from storage.shards import ShardInfo
from tasks.components import captioner, device


@task(name="caption-version", cache_policy=NO_CACHE)
def caption_version(llava: str, prompt: str, generation: GenerationParams) -> CaptionVersion:
    """The version LLaVA at `llava` writes for this prompt and decoding (its id also hashes the model config)."""
    return CaptionVersion(**captioner(llava, device()).version_spec(prompt, generation))


@task(name="caption-shard", retries=1, cache_policy=NO_CACHE)
def caption_shard(
    llava: str,
    store_root: str,
    image_shard_url: str,
    image_shard: ShardInfo,
    version: CaptionVersion,
    batch_size: int,
) -> str:
    """Caption one image shard for `version` (skipped if stored); returns its caption table's URL."""
    return captions_lib.caption_shard(
        image_shard_url, image_shard, captioner(llava, device()), CaptionStore(store_root), version, batch_size
    )
