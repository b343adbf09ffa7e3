"""LLaVA auto-captioning: the captioner on the tiny LLaVA, caption versions, the caption store, flags, selection."""

import io
import json
import random
import shutil
import uuid

import fsspec
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from models.captioner import DEFAULT_PROMPT, GenerationParams, LlavaCaptioner
from storage.captions import (
    CAPTION_SCHEMA,
    CaptionChoice,
    CaptionStore,
    CaptionVersion,
    caption_flags,
    caption_shard,
    caption_stats,
    concept_density,
    select_captions,
)
from storage.fs import filesystem
from storage.shards import write_shard
from storage.tables import write_table

GEN = GenerationParams(max_new_tokens=8)
SIZES = [(40, 30), (64, 96), (200, 50), (33, 33), (90, 60)]


@pytest.fixture(scope="module")
def captioner(tiny):
    return LlavaCaptioner.from_pretrained(tiny.llava_dir)


class CountingCaptioner:
    """Forwards to a captioner and counts the images it was asked to caption."""

    def __init__(self, inner: LlavaCaptioner):
        self.inner, self.name, self.config_hash, self.images = inner, inner.name, inner.config_hash, 0

    def caption(self, images, prompt, generation):
        self.images += len(images)
        return self.inner.caption(images, prompt, generation)


def jpeg(size, seed: int) -> bytes:
    colour = tuple(random.Random(seed).randrange(256) for _ in range(3))
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def image_sample(key: str, size=(32, 32), seed: int = 0, caption: str = "", data: bytes | None = None) -> dict:
    """A sample as ingest writes it: KEY.jpg, KEY.json, KEY.txt."""
    meta = {"key": key, "source": f"test:{key}", "width": size[0], "height": size[1], "meta": {}}
    return {"__key__": key, "jpg": jpeg(size, seed) if data is None else data, "json": meta, "txt": caption}


def image_shard(url: str, prefix: str, sizes=SIZES, captions=None):
    captions = captions or [f"sidecar caption {i}" for i in range(len(sizes))]
    samples = [image_sample(f"{prefix}_{i}", size, i, captions[i]) for i, size in enumerate(sizes)]
    return url, write_shard(url, samples)


def copy_llava(tiny, dest, padding_side: str | None = None):
    shutil.copytree(tiny.llava_dir, dest)
    if padding_side:
        path = dest / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "padding_side": padding_side}))
    return dest


# ---------------------------------------------------------------------------------------------------
#                                     Captioner
# ---------------------------------------------------------------------------------------------------


def test_captions_a_left_padded_batch_of_images_of_different_sizes(tiny, tmp_path):
    captioner = LlavaCaptioner.from_pretrained(copy_llava(tiny, tmp_path / "llava", padding_side="right"))
    assert captioner.processor.tokenizer.padding_side == "left"  # set for batched generation, whatever was saved
    assert captioner.chat_prompt(DEFAULT_PROMPT) == f"USER: <image>\n{DEFAULT_PROMPT} ASSISTANT:"

    colours = ["red", "green", "blue"]
    images = [Image.new("RGB", SIZES[i], colours[i]) for i in range(3)] + [Image.new("L", (20, 70))]
    results = captioner.caption(images, generation=GEN)
    assert len(results) == 4
    for r in results:
        assert isinstance(r.text, str) and r.text == r.text.strip()
        assert 0 < r.tokens <= GEN.max_new_tokens
        assert r.truncated == (r.tokens == GEN.max_new_tokens)  # no EOS within the cap
    # Batching changes nothing: each image alone gets the caption it got in the batch.
    assert [captioner.caption([image], generation=GEN)[0] for image in images] == results


def test_greedy_captions_are_deterministic_and_sampling_follows_the_seed(tiny, captioner):
    images = [Image.new("RGB", size, "blue") for size in SIZES[:2]]
    first = captioner.caption(images, generation=GEN)
    assert LlavaCaptioner.from_pretrained(tiny.llava_dir).caption(images, generation=GEN) == first

    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 1}
    state = torch.random.get_rng_state()
    assert captioner.caption(images, generation=sampled) == captioner.caption(images, generation=sampled)
    assert captioner.caption(images, generation={**sampled, "seed": 2}) != captioner.caption(images, generation=sampled)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_version_id_is_stable_and_changes_with_prompt_and_decoding(tiny, captioner, tmp_path):
    version = CaptionVersion(**captioner.version_spec(DEFAULT_PROMPT, GEN))
    # Same model elsewhere (another path, another load): same version.
    elsewhere = LlavaCaptioner.from_pretrained(copy_llava(tiny, tmp_path / "elsewhere" / "llava"))
    assert CaptionVersion(**elsewhere.version_spec(DEFAULT_PROMPT, GEN)).id == version.id
    # The unused sampling seed of a greedy run does not make a new version.
    assert CaptionVersion(**captioner.version_spec(DEFAULT_PROMPT, {"max_new_tokens": 8, "seed": 5})).id == version.id

    variants = [
        ("Describe this image briefly.", GEN),
        (DEFAULT_PROMPT, {"max_new_tokens": 9}),
        (DEFAULT_PROMPT, {"max_new_tokens": 8, "num_beams": 2}),
        (DEFAULT_PROMPT, {"max_new_tokens": 8, "do_sample": True}),
        (DEFAULT_PROMPT, {"max_new_tokens": 8, "do_sample": True, "seed": 1}),
        (DEFAULT_PROMPT, {"max_new_tokens": 8, "repetition_penalty": 1.2}),
    ]
    ids = {CaptionVersion(**captioner.version_spec(p, g)).id for p, g in variants} | {version.id}
    assert len(ids) == len(variants) + 1
    assert version.id.startswith("llava-") and "max_new_tokens=8" in version.label

    # Pinned: the id of a fixed spec never changes between runs, machines or releases of this code.
    pinned = CaptionVersion(
        model="llava-hf/llava-1.5-7b-hf",
        model_config_hash="0123456789abcdef",
        prompt=DEFAULT_PROMPT,
        generation=GenerationParams().effective(),
    )
    assert pinned.id == "llava-1.5-7b-hf-a301fb06d361"


# ---------------------------------------------------------------------------------------------------
#                                     Caption store
# ---------------------------------------------------------------------------------------------------


def test_incremental_captioning_and_a_new_version_beside_the_old(captioner, tmp_path):
    # 1. Two image shards, captioned for v1
    url_a, a = image_shard(str(tmp_path / "ingest-1" / "shards" / "000000.tar"), "a", SIZES[:3])
    url_b, b = image_shard(str(tmp_path / "ingest-1" / "shards" / "000001.tar"), "b", SIZES[3:])
    store = CaptionStore(str(tmp_path / "captions"))
    counting = CountingCaptioner(captioner)
    v1 = CaptionVersion(**captioner.version_spec(DEFAULT_PROMPT, GEN))
    assert store.missing(v1.id, [a, b]) == [a, b]

    table_a = caption_shard(url_a, a, counting, store, v1, batch_size=2)
    assert table_a == str(tmp_path / "captions" / v1.id / f"{a.sha256}.parquet")
    rows = store.read_shard(v1.id, a.sha256)
    assert [r["key"] for r in rows] == ["a_0", "a_1", "a_2"] and counting.images == 3
    assert list(rows[0]) == CAPTION_SCHEMA.names
    for r in rows:
        assert r["version"] == v1.id and isinstance(r["caption"], str) and 0 < r["tokens"] <= 8
        assert r["concept_density"] == concept_density(r["caption"])
        assert r["flags"] == caption_flags(r["caption"], DEFAULT_PROMPT, truncated=r["tokens"] == 8)

    # 2. Done shards are skipped, also when an identical shard comes in another artifact
    assert caption_shard(url_a, a, counting, store, v1) == table_a
    copy_url = str(tmp_path / "ingest-2" / "shards" / "000000.tar")
    (tmp_path / "ingest-2" / "shards").mkdir(parents=True)
    shutil.copy(url_a, copy_url)
    assert caption_shard(copy_url, a, counting, store, v1) == table_a
    assert counting.images == 3
    assert store.missing(v1.id, [a, b]) == [b]
    caption_shard(url_b, b, counting, store, v1)
    assert counting.images == 5 and store.missing(v1.id, [a, b]) == []

    # 3. A damaged caption table is redone, not trusted
    v1_rows_b = store.read_shard(v1.id, b.sha256)
    with open(store.shard_url(v1.id, b.sha256), "r+b") as f:
        f.truncate(20)
    assert store.missing(v1.id, [a, b]) == [b]
    caption_shard(url_b, b, counting, store, v1)
    assert counting.images == 7 and store.read_shard(v1.id, b.sha256) == v1_rows_b

    # 4. A new prompt is a new version beside the old one; the old captions stay
    v2 = CaptionVersion(**captioner.version_spec("Describe this image briefly.", GEN))
    v1_rows_a = store.read_shard(v1.id, a.sha256)
    caption_shard(url_a, a, counting, store, v2)
    assert counting.images == 10
    assert {v.id for v in store.versions()} == {v1.id, v2.id}
    assert store.version(v2.id) == v2 and store.read_shard(v1.id, a.sha256) == v1_rows_a
    assert store.missing(v2.id, [a, b]) == [b]

    stats = caption_stats(store, v1.id)
    assert (stats.shards, stats.count, stats.captioned, stats.missing_shards) == (2, 5, 5, 0)
    assert 0 < stats.mean_tokens <= 8 and set(stats.flagged) >= {"empty", "repetition", "undecodable"}
    assert caption_stats(store, v2.id, [a, b]).missing_shards == 1

    # 5. A captioner cannot write another model's version
    other = CaptionVersion(**{**v1.model_dump(), "model": "another-llava"})
    with pytest.raises(ValueError, match="cannot write version"):
        caption_shard(url_a, a, counting, store, other)


def test_corrupt_images_are_flagged_not_fatal_on_a_memory_store(captioner):
    root = f"memory://captions-test-{uuid.uuid4().hex[:8]}"
    try:
        good = jpeg((48, 40), 0)
        samples = [
            image_sample("ok_0", (48, 40), 0, caption="a red square"),
            image_sample("cut", data=good[: len(good) // 2], caption="a truncated file"),
            image_sample("junk", data=b"not an image", caption="junk bytes"),
            image_sample("ok_1", (30, 70), 1),
        ]
        url = f"{root}/images/shards/000000.tar"
        info = write_shard(url, samples)
        store = CaptionStore(f"{root}/captions")
        version = CaptionVersion(**captioner.version_spec(DEFAULT_PROMPT, GEN))

        table = caption_shard(url, info, captioner, store, version, batch_size=3)
        assert table.startswith(root) and store.missing(version.id, [info]) == []
        rows = {r["key"]: r for r in store.read_shard(version.id, info.sha256)}
        for key in ("cut", "junk"):
            assert rows[key]["flags"] == ["undecodable"] and rows[key]["caption"] == ""
        assert rows["ok_0"]["tokens"] > 0 and "undecodable" not in rows["ok_1"]["flags"]

        stats = caption_stats(store, version.id)
        assert (stats.count, stats.captioned, stats.flagged["undecodable"]) == (4, 2, 2)
        # Training falls back to the sidecar caption for them.
        chosen = select_captions(url, info, CaptionChoice(source="llava", version=version.id), store)
        assert chosen["cut"] == "a truncated file" and chosen["ok_0"] == rows["ok_0"]["caption"]
    finally:
        fs, path = filesystem(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        assert isinstance(fs, fsspec.implementations.memory.MemoryFileSystem)


# ---------------------------------------------------------------------------------------------------
#                                     Flags and concept density
# ---------------------------------------------------------------------------------------------------


def test_flags_on_degenerate_captions():
    prompt = DEFAULT_PROMPT
    natural = (
        "The image features a small red car parked next to a wooden house, with tall trees under a cloudy sky. "
        "In the background, there is a river and a mountain. The style is a realistic photo with soft light."
    )
    assert caption_flags(natural, prompt) == []
    for empty in ["", "   ", "... 12, 3!"]:
        assert caption_flags(empty, prompt) == ["empty"]
    loops = [
        "A red car, " * 6,
        "The sky is very very very very blue.",
        "A small dog sits on a wooden chair in the garden. " * 2,
        " ".join(random.Random(0).choice(["red", "blue", "car", "tree", "sky", "dog"]) for _ in range(40)),
    ]
    for loop in loops:
        assert caption_flags(loop, prompt) == ["repetition"], loop
    assert caption_flags(f"{prompt} A red car on a road.", prompt) == ["prompt_echo"]
    assert caption_flags("describe THIS image, and its style -- in a very detailed manner", prompt) == ["prompt_echo"]
    assert caption_flags("A red car.", prompt, truncated=True) == ["truncated"]
    assert caption_flags("", prompt, truncated=True) == ["empty", "truncated"]


def test_concept_density_counts_distinct_content_words():
    assert concept_density("A red car next to a red house; the car is shiny.") == 5  # red car next house shiny
    assert concept_density("The image features a dog.") == 1  # boilerplate and function words excluded
    assert concept_density("Café, CAFÉ and 3 cafés") == 2  # lowercased letters only: café, cafés
    assert concept_density("") == 0


# ---------------------------------------------------------------------------------------------------
#                                     Caption selection
# ---------------------------------------------------------------------------------------------------


def test_select_captions_sidecar_llava_and_mix_with_fallback(tmp_path):
    # 40 samples; sidecar captions except for k_4 (none). LLaVA: k_0 degenerate, k_1 truncated (accepted by
    # default), k_2 undecodable, k_3 missing, k_4 good.
    n = 40
    sidecar = {f"k_{i}": ("" if i == 4 else f"sidecar {i}") for i in range(n)}
    url, info = image_shard(str(tmp_path / "images" / "000000.tar"), "k", [(8, 8)] * n, list(sidecar.values()))
    store = CaptionStore(str(tmp_path / "captions"))
    version = CaptionVersion(model="m", model_config_hash="0" * 16, prompt="p", generation={"max_new_tokens": 8})
    store.register(version)
    flags = {0: ["repetition"], 1: ["truncated"], 2: ["undecodable"]}
    rows = [
        {
            "key": f"k_{i}",
            "caption": f"llava {i}",
            "tokens": 2,
            "concept_density": 1,
            "flags": flags.get(i, []),
            "version": version.id,
        }
        for i in range(n)
        if i != 3
    ]
    write_table(store.shard_url(version.id, info.sha256), rows, schema=CAPTION_SCHEMA)

    def select(**choice):
        return select_captions(url, info, CaptionChoice(**choice), store)

    assert select() == sidecar
    llava = select(source="llava", version=version.id)
    assert [llava[f"k_{i}"] for i in range(6)] == [
        "sidecar 0",
        "llava 1",
        "sidecar 2",
        "sidecar 3",
        "llava 4",
        "llava 5",
    ]
    assert select(source="llava", version=version.id, reject_flags=["repetition", "truncated"])["k_1"] == "sidecar 1"

    assert select(source="mix", version=version.id, mix_prob=1.0) == llava
    never = select(source="mix", version=version.id, mix_prob=0.0)
    assert never == {**sidecar, "k_4": "llava 4"}  # an empty sidecar caption falls back to a good LLaVA one
    half = select(source="mix", version=version.id, mix_prob=0.5)
    assert half == select(source="mix", version=version.id, mix_prob=0.5)  # deterministic per key
    took_llava = {k for k, v in half.items() if v.startswith("llava")}
    assert 10 < len(took_llava) < 30 and half["k_0"] == "sidecar 0"
    assert select(source="mix", version=version.id, mix_prob=0.5, seed=1) != half

    with pytest.raises(ValidationError, match="needs a caption version"):
        CaptionChoice(source="llava")
    with pytest.raises(ValidationError):
        CaptionChoice(source="llava", version=version.id, reject_flags=["blurry"])
    with pytest.raises(FileNotFoundError, match="no caption version"):
        select(source="llava", version="m-000000000000")
