"""Versioned auto-captions beside the image shards: quality flags, a content-addressed store, and the choice
of which caption feeds training.

    <root>/<version id>/version.json                    model, config hash, prompt, generation (+ label, created)
    <root>/<version id>/<image shard sha256>.parquet    one row per sample of that image shard

A caption version is everything that determines a caption: the captioner (model name and config hash), the
prompt and the decoding parameters; its id hashes them, so a re-run finds the same directory and a new prompt
or model gets a new one beside the old. Inside a version, captions are filed under the sha256 of the image
shard they describe, not its artifact or name: the same shard bytes are never captioned twice for a version,
even when a later ingest artifact contains an identical shard. `caption_shard` is the unit of work (one image
shard, resumable, atomic); `select_captions` picks the text that training sees per sample.

This module does not import `models/`: any object with the `Captioner` protocol captions (`models.captioner.
LlavaCaptioner` is the production one), and flags and concept density are plain text analysis.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Literal, Protocol

import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.fs import exists, filesystem, join, read_json, write_json
from storage.shards import ShardInfo, iter_shard
from storage.tables import read_table, write_table

FORMAT_VERSION = 1  # of the store's layout and columns; part of every version id

# ---------------------------------------------------------------------------------------------------
#                                     Caption quality
# ---------------------------------------------------------------------------------------------------

Flag = Literal["empty", "repetition", "prompt_echo", "truncated", "undecodable"]
FLAGS: tuple[Flag, ...] = ("empty", "repetition", "prompt_echo", "truncated", "undecodable")

WORD = re.compile(r"[^\W\d_]+")  # a maximal run of letters (any alphabet); digits and '_' split words

# Degenerate repetition (the loops greedy decoding can fall into): any one of
REPEAT_PHRASE_WORDS, REPEAT_PHRASE_COPIES = 8, 4  # a phrase of <= 8 words repeated 4+ times back to back,
REPEAT_SPAN_WORDS = 10  # a 10-word sequence occurring twice anywhere (a repeated sentence),
LOW_DISTINCT_MIN_WORDS, LOW_DISTINCT_RATIO = 30, 0.3  # or, from 30 words on, under 30% distinct words.

# English function words (NLTK's English stop-word list; its contractions appear as their letter runs:
# "don't" -> "don", "t") and the boilerplate of LLaVA's captions ("The image features ..."), which says
# nothing about the picture and would inflate every LLaVA caption's density against sidecar captions.
STOP_WORDS = frozenset(
    """
    a about above after again against ain all am an and any are aren as at be because been before being below
    between both but by can couldn d did didn do does doesn doing don down during each few for from further had
    hadn has hasn have haven having he her here hers herself him himself his how i if in into is isn it its itself
    just ll m ma me mightn more most mustn my myself needn no nor not now o of off on once only or other our ours
    ourselves out over own re s same shan she should shouldn so some such t than that the their theirs them
    themselves then there these they this those through to too under until up ve very was wasn we were weren what
    when where which while who whom why will with won wouldn y you your yours yourself yourselves
    image picture scene shows showing features featuring depicts depicting displays displaying appears visible
    also overall seen
    """.split()
)


def words(text: str) -> list[str]:
    """Lowercased alphabetic words of `text`, in order."""
    return WORD.findall(text.lower())


def concept_density(text: str) -> int:
    """Number of distinct content words: distinct `words(text)` that are not in STOP_WORDS.

    "A red car next to a red house; the car is shiny." -> {red, car, next, house, shiny} = 5.
    A proxy for the paper's "valid distinct nouns per image" that needs no part-of-speech tagger.
    """
    return len(set(words(text)) - STOP_WORDS)


def is_repetitive(ws: Sequence[str]) -> bool:
    """True if the words `ws` look like a generation loop (see REPEAT_* and LOW_DISTINCT_*)."""
    # 1. A phrase of up to REPEAT_PHRASE_WORDS words, REPEAT_PHRASE_COPIES times back to back
    for n in range(1, REPEAT_PHRASE_WORDS + 1):
        for i in range(len(ws) - n * REPEAT_PHRASE_COPIES + 1):
            phrase = ws[i : i + n]
            if all(ws[i + k * n : i + (k + 1) * n] == phrase for k in range(1, REPEAT_PHRASE_COPIES)):
                return True
    # 2. A long word sequence (a sentence) occurring twice
    seen = set()
    for i in range(len(ws) - REPEAT_SPAN_WORDS + 1):
        span = tuple(ws[i : i + REPEAT_SPAN_WORDS])
        if span in seen:
            return True
        seen.add(span)
    # 3. Few distinct words in a long caption
    return len(ws) >= LOW_DISTINCT_MIN_WORDS and len(set(ws)) / len(ws) < LOW_DISTINCT_RATIO


def contains_run(ws: Sequence[str], run: Sequence[str]) -> bool:
    n = len(run)
    return n > 0 and any(ws[i : i + n] == run for i in range(len(ws) - n + 1))


def caption_flags(text: str, prompt: str, truncated: bool = False) -> list[str]:
    """Quality flags of one generated caption, in FLAGS order.

    empty:       no word at all (blank, or only punctuation and digits).
    repetition:  a degenerate loop (`is_repetitive`).
    prompt_echo: the prompt's words appear in the caption as one contiguous run (case and punctuation ignored).
    truncated:   generation stopped at max_new_tokens, not at the end-of-sequence token.
    ("undecodable", for images that could not be read, is set by `caption_shard`, never here.)
    """
    ws = words(text)
    flags = []
    if not ws:
        flags.append("empty")
    if is_repetitive(ws):
        flags.append("repetition")
    if contains_run(ws, words(prompt)):
        flags.append("prompt_echo")
    if truncated:
        flags.append("truncated")
    return flags


# ---------------------------------------------------------------------------------------------------
#                                     Versions and the store
# ---------------------------------------------------------------------------------------------------


class CaptionVersion(BaseModel):
    """What determines a caption: `LlavaCaptioner.version_spec(prompt, generation)` gives these fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="hub id, or the name of a local model directory (not its location)")
    model_config_hash: str = Field(description="hash of the model's config.json and chat template")
    prompt: str
    generation: dict = Field(description="decoding parameters that change the output")

    @classmethod
    def from_record(cls, record: dict) -> CaptionVersion:
        """The version a `version.json` describes (its id, label and creation time are derived or ignored)."""
        return cls.model_validate({k: v for k, v in record.items() if k in cls.model_fields})

    @property
    def id(self) -> str:
        """`<model slug>-<12 hex>`, e.g. 'llava-1.5-7b-hf-3fa2b9c01d2e': stable across runs and machines."""
        payload = json.dumps({**self.model_dump(), "format_version": FORMAT_VERSION}, sort_keys=True)
        slug = re.sub(r"[^a-z0-9.]+", "-", self.model.rsplit("/", 1)[-1].lower()).strip("-.")[:40] or "model"
        return f"{slug}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    @property
    def label(self) -> str:
        """One line for humans: model, decoding parameters, start of the prompt."""
        params = " ".join(f"{k}={v}" for k, v in sorted(self.generation.items()))
        prompt = self.prompt if len(self.prompt) <= 60 else self.prompt[:57] + "..."
        return f"{self.model} {params} prompt={prompt!r}"


# Columns of every caption table, one row per sample of the image shard, in shard order.
CAPTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the image shard's __key__
        pa.field("caption", pa.string(), nullable=False),  # generated text ("" if undecodable)
        pa.field("tokens", pa.int32(), nullable=False),  # caption length in the captioner's tokenizer
        pa.field("concept_density", pa.int32(), nullable=False),  # concept_density(caption)
        pa.field("flags", pa.list_(pa.string()), nullable=False),  # subset of FLAGS, in FLAGS order
        pa.field("version", pa.string(), nullable=False),  # CaptionVersion.id
    ]
)


class CaptionStore:
    """Caption versions under one root: a local directory or an fsspec URL (see the module docstring)."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def version_url(self, version_id: str) -> str:
        return join(self.root, version_id)

    def shard_url(self, version_id: str, image_shard_sha256: str) -> str:
        return join(self.root, version_id, f"{image_shard_sha256}.parquet")

    def register(self, version: CaptionVersion) -> None:
        """Write `version.json` if the version is new; an existing one must describe the same version."""
        url = join(self.version_url(version.id), "version.json")
        if exists(url):
            stored = CaptionVersion.from_record(read_json(url))
            if stored != version:
                raise ValueError(f"{url} describes {stored.label}, not {version.label} (same id {version.id})")
            return
        record = {
            **version.model_dump(),
            "id": version.id,
            "label": version.label,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(url, record)

    def version(self, version_id: str) -> CaptionVersion:
        url = join(self.version_url(version_id), "version.json")
        if not exists(url):
            raise FileNotFoundError(
                f"no caption version {version_id!r} under {self.root}; known: {[v.id for v in self.versions()]}"
            )
        return CaptionVersion.from_record(read_json(url))

    def versions(self) -> list[CaptionVersion]:
        """Every registered version, by id."""
        fs, path = filesystem(self.root)
        if not fs.exists(path):
            return []
        ids = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        return [self.version(i) for i in ids if exists(join(self.version_url(i), "version.json"))]

    def has_shard(self, version_id: str, info: ShardInfo) -> bool:
        """True if the image shard's captions for this version are stored, readable, and complete."""
        url = self.shard_url(version_id, info.sha256)
        if not exists(url):
            return False
        try:
            table = read_table(url)
        except (OSError, ValueError, pa.ArrowException):
            return False
        return table.schema.names == CAPTION_SCHEMA.names and table.num_rows == info.count

    def missing(self, version_id: str, shards: Iterable[ShardInfo]) -> list[ShardInfo]:
        """The image shards not yet captioned for this version: what an incremental run has to do."""
        return [info for info in shards if not self.has_shard(version_id, info)]

    def read_shard(self, version_id: str, image_shard_sha256: str) -> list[dict]:
        """The caption rows of one image shard (CAPTION_SCHEMA columns), in shard order."""
        url = self.shard_url(version_id, image_shard_sha256)
        if not exists(url):
            raise FileNotFoundError(
                f"image shard {image_shard_sha256} has no captions for version {version_id} ({url}); "
                "run caption_shard on it first"
            )
        return read_table(url).to_pylist()

    def shard_hashes(self, version_id: str) -> list[str]:
        """sha256 of every image shard captioned for this version."""
        fs, path = filesystem(self.version_url(version_id))
        if not fs.exists(path):
            return []
        names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        return sorted(n.removesuffix(".parquet") for n in names if n.endswith(".parquet"))


# ---------------------------------------------------------------------------------------------------
#                                     Captioning one shard
# ---------------------------------------------------------------------------------------------------


class GeneratedCaption(Protocol):
    text: str
    tokens: int
    truncated: bool


class Captioner(Protocol):
    """What `caption_shard` needs of a captioner (`models.captioner.LlavaCaptioner` has it)."""

    name: str
    config_hash: str

    def caption(self, images: list[Image.Image], prompt: str, generation: dict) -> Sequence[GeneratedCaption]: ...


def decode_image(data: bytes | None) -> Image.Image | None:
    """The RGB image in `data`, or None if it is absent or cannot be decoded (truncated, not an image)."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # decodes every pixel, so a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def batched(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_shard(
    image_shard_url: str,
    image_shard_info: ShardInfo,
    captioner: Captioner,
    store: CaptionStore,
    version: CaptionVersion,
    batch_size: int = 8,
) -> str:
    """Caption every sample of one image shard for `version`; returns the caption table's URL.

    Skipped if the table already exists, is readable and has a row per sample. An image that cannot be
    decoded gets a row with an empty caption and the flag "undecodable"; it never stops the shard. The
    table is written atomically, so an interrupted shard is simply redone.
    """
    # 1. Check inputs; reuse finished work
    if (captioner.name, captioner.config_hash) != (version.model, version.model_config_hash):
        raise ValueError(
            f"captioner {captioner.name} (config {captioner.config_hash}) cannot write version {version.id}, "
            f"which is {version.model} (config {version.model_config_hash})"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    url = store.shard_url(version.id, image_shard_info.sha256)
    if store.has_shard(version.id, image_shard_info):
        return url
    store.register(version)

    # 2. Caption batch by batch; undecodable images get their row without a caption
    rows = []
    for batch in batched(iter_shard(image_shard_url, image_shard_info), batch_size):
        images = [decode_image(sample.get("jpg")) for sample in batch]
        decoded = [image for image in images if image is not None]
        results = list(captioner.caption(decoded, prompt=version.prompt, generation=version.generation))
        if len(results) != len(decoded):
            raise ValueError(f"captioner {captioner.name} returned {len(results)} captions for {len(decoded)} images")
        results = iter(results)
        for sample, image in zip(batch, images, strict=True):
            row = {"key": sample["__key__"], "version": version.id}
            if image is None:
                row |= {"caption": "", "tokens": 0, "concept_density": 0, "flags": ["undecodable"]}
            else:
                result = next(results)
                row |= {
                    "caption": result.text,
                    "tokens": result.tokens,
                    "concept_density": concept_density(result.text),
                    "flags": caption_flags(result.text, version.prompt, result.truncated),
                }
            rows.append(row)

    # 3. Write the table (atomically)
    write_table(url, rows, schema=CAPTION_SCHEMA)
    return url


# ---------------------------------------------------------------------------------------------------
#                                     Reports
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionStats:
    version: str
    shards: int  # caption tables read
    missing_shards: int  # requested image shards with no caption table yet
    count: int  # samples
    captioned: int  # samples whose image decoded (count - undecodable)
    mean_tokens: float  # over captioned samples
    mean_concept_density: float  # over captioned samples
    flagged: dict[str, int]  # samples per flag, every flag listed
    flagged_any: int  # samples with at least one flag

    def to_dict(self) -> dict:
        return asdict(self)


def caption_stats(store: CaptionStore, version_id: str, shards: Iterable[ShardInfo] | None = None) -> CaptionStats:
    """Summary of one version's captions: over `shards` (image shards), or every shard captioned so far."""
    hashes = store.shard_hashes(version_id) if shards is None else [s.sha256 for s in shards]
    flagged, flagged_any, count, tokens, density, found = Counter(), 0, 0, [], [], 0
    for sha256 in hashes:
        if not exists(store.shard_url(version_id, sha256)):
            continue
        found += 1
        for row in store.read_shard(version_id, sha256):
            count += 1
            flagged.update(row["flags"])
            flagged_any += bool(row["flags"])
            if "undecodable" not in row["flags"]:
                tokens.append(row["tokens"])
                density.append(row["concept_density"])
    return CaptionStats(
        version=version_id,
        shards=found,
        missing_shards=len(hashes) - found,
        count=count,
        captioned=len(tokens),
        mean_tokens=sum(tokens) / len(tokens) if tokens else 0.0,
        mean_concept_density=sum(density) / len(density) if density else 0.0,
        flagged={flag: flagged[flag] for flag in FLAGS},
        flagged_any=flagged_any,
    )


# ---------------------------------------------------------------------------------------------------
#                                     Which caption trains
# ---------------------------------------------------------------------------------------------------


class CaptionChoice(BaseModel):
    """Which caption feeds training: the source's own (sidecar), LLaVA's, or a per-sample mix of both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["sidecar", "llava", "mix"] = Field("sidecar", description="where training captions come from")
    version: str | None = Field(None, description="caption version id (CaptionVersion.id); needed for llava/mix")
    mix_prob: float = Field(0.5, ge=0, le=1, description="mix: probability of taking the LLaVA caption")
    seed: int = Field(0, description="mix: the per-key draw hashes (seed, key), so it is the same every epoch")
    reject_flags: tuple[Flag, ...] = Field(
        ("empty", "repetition", "prompt_echo", "undecodable"),
        description="a LLaVA caption with any of these flags is not used (the sidecar caption is)",
    )

    @model_validator(mode="after")
    def _check_version(self) -> CaptionChoice:
        if self.source != "sidecar" and not self.version:
            raise ValueError(f"source={self.source!r} needs a caption version id (version=...)")
        return self


def mix_draw(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select_captions(
    image_shard_url: str, image_shard_info: ShardInfo, choice: CaptionChoice, store: CaptionStore
) -> dict[str, str]:
    """{key: caption text for training} for every sample of one image shard.

    sidecar: the shard's own caption (KEY.txt, "" if none).
    llava:   the version's caption, or the sidecar caption when it is missing or has a rejected flag.
    mix:     the LLaVA caption with probability mix_prob (drawn per key), else the sidecar one; if the drawn
             one is unusable (LLaVA missing/rejected, sidecar empty) the other one, when that is usable.
    """
    # 1. Sidecar captions from the image shard
    sidecar = {s["__key__"]: s.get("txt", b"").decode("utf-8") for s in iter_shard(image_shard_url, image_shard_info)}
    if choice.source == "sidecar":
        return sidecar

    # 2. Usable LLaVA captions of this version (a missing table is an ordering error, not a fallback)
    store.version(choice.version)  # raises, listing the known versions, if it does not exist
    rejected = set(choice.reject_flags)
    llava = {
        row["key"]: row["caption"]
        for row in store.read_shard(choice.version, image_shard_info.sha256)
        if not rejected & set(row["flags"])
    }

    # 3. Choose per sample
    captions = {}
    for key, own in sidecar.items():
        generated = llava.get(key)
        want_llava = choice.source == "llava" or mix_draw(choice.seed, key) < choice.mix_prob
        if want_llava:
            captions[key] = generated if generated is not None else own
        else:
            captions[key] = own if own.strip() or generated is None else generated
    return captions
