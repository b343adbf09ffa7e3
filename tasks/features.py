"""Feature tasks: one image shard -> one feature shard (T5 + latents, on Ray), and finishing the artifact.

See storage.features. The captions a shard is encoded with are chosen here per shard (storage.captions.
select_captions): the source's own, or a caption version's, by the pipeline's caption choice.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

import storage.features as features_lib
from storage.artifacts import ArtifactStore
from storage.captions import CaptionChoice, CaptionStore, select_captions
from storage.shards import ShardInfo
from tasks.components import Components, device, latent_codec, text_encoder


@task(name="extract-shard", retries=1, cache_policy=NO_CACHE)
def extract_shard(
    root: str,
    images_id: str,
    features_id: str,
    image_shard: ShardInfo,
    components: Components,
    base_resolution: int,
    batch_size: int,
    choice: CaptionChoice | None = None,
    caption_root: str | None = None,
) -> ShardInfo:
    """Encode one image shard into the feature shard of the same name; reused if already complete.

    choice: which captions to encode (None: the image shard's own, KEY.txt).
    """
    store = ArtifactStore(root)
    images, out = store.get(images_id), store.get(features_id)
    url = images.shard_url(image_shard.name)
    captions = select_captions(url, image_shard, choice, CaptionStore(caption_root)) if choice else None
    on = device()
    return features_lib.extract_shard(
        url,
        image_shard,
        out,
        image_shard.name,
        text_encoder(components.t5, on),
        latent_codec(components.codec, on),
        captions=captions,
        base_resolution=base_resolution,
        batch_size=batch_size,
    )


@task(name="finish-features", cache_policy=NO_CACHE)
def finish_features(root: str, images_id: str, features_id: str, components: Components, base_resolution: int) -> dict:
    """Write the manifest of a feature artifact whose every shard is extracted; returns the manifest."""
    store = ArtifactStore(root)
    images, out = store.get(images_id), store.get(features_id)
    missing = [info.name for info in images.shards() if not out.shard_done(info.name, checksum=False)]
    if missing:
        raise RuntimeError(f"feature artifact {out.id} lacks shards {missing}: extract them before finishing")
    on = device()
    # Every shard is done, so this only checks them and writes the manifest with the encoders' properties.
    return features_lib.extract_features(
        images,
        out,
        text_encoder(components.t5, on),
        latent_codec(components.codec, on),
        base_resolution=base_resolution,
        progress=False,
    )
