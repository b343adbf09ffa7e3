"""LLaVA auto-captioning: images -> detailed captions, as PixArt-alpha recaptioned SAM and its other data.

The paper captions with LLaVA-1.5 and the prompt "Describe this image and its style in a very detailed
manner" (`DEFAULT_PROMPT`). The model and its processor are named by a hub id or a local directory and loaded
with transformers' own `from_pretrained` (`LlavaForConditionalGeneration`, `AutoProcessor`); the tests load
a tiny one built by `models.tiny` the same way.

A batch is generated in one `generate` call: prompts are left-padded (a decoder-only model continues from the
last position of every row, so padding must come first), and only the tokens after the prompt are decoded.
This module knows the model; judging and storing captions (quality flags, versions, parquet) is
`storage.captions`'s business.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from models.text_encoder import default_dtype, resolve_pretrained

if TYPE_CHECKING:  # transformers' model code takes seconds to import: loaded on use (every config imports this)
    from transformers import LlavaForConditionalGeneration

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT = "Describe this image and its style in a very detailed manner."  # the paper's SAM prompt

# Keys of config.json that say where or how a model was saved or loaded, not what it computes: left out of
# `config_hash`, so a copy of the same model, a re-save by another transformers release, or a load in another
# precision keeps its caption versions.
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype"})


class GenerationParams(BaseModel):
    """How captions are decoded. Every field that changes the output is part of the caption version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(
        256, ge=1, description="caption length cap in tokens; a caption that hits it is truncated"
    )
    do_sample: bool = Field(False, description="sample (with temperature, top_p, seed) instead of greedy/beam search")
    temperature: float = Field(1.0, gt=0, description="softmax temperature when sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass when sampling")
    num_beams: int = Field(1, ge=1, description="beam search width (1: greedy or plain sampling)")
    repetition_penalty: float = Field(1.0, gt=0, description=">1 discourages repeated tokens (CTRL's penalty)")
    seed: int = Field(0, description="torch seed set at the start of every `caption` call when sampling")

    def effective(self) -> dict:
        """The fields that change the output: the sampling fields only count when sampling.

        Caption versions hash this, so a greedy run with another (unused) seed is the same version.
        """
        params = self.model_dump()
        if not self.do_sample:
            for name in ("temperature", "top_p", "seed"):
                params.pop(name)
        return params


@dataclass(frozen=True)
class CaptionResult:
    """One generated caption and what the model alone can tell about it."""

    text: str  # the decoded new tokens, special tokens removed, stripped
    tokens: int  # tokens generated for `text` (the captioner's tokenizer), EOS and padding not counted
    truncated: bool  # generation hit max_new_tokens before the end-of-sequence token


class LlavaCaptioner:
    """A frozen LLaVA and its processor, writing one caption per image for a fixed prompt."""

    def __init__(self, model: LlavaForConditionalGeneration, processor, name: str, config_hash: str):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # Batched generation continues every row from its last position: pad on the left.
        self.processor.tokenizer.padding_side = "left"
        self.name = name
        self.config_hash = config_hash

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike = DEFAULT_LLAVA,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LlavaCaptioner:
        """Load a LLaVA model and its processor from a hub id or a directory written by `save_pretrained`."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration, PretrainedConfig

        # 1. Find and check the config
        name, _ = resolve_pretrained(id_or_dir, "llava", "LLaVA captioner")
        config, _ = PretrainedConfig.get_config_dict(name)
        if config.get("model_type") != "llava":
            raise ValueError(f"{name} has model_type={config.get('model_type')!r}; expected a LLaVA model ('llava')")

        # 2. Load the model and processor through transformers
        dtype = dtype or default_dtype(device)
        model = LlavaForConditionalGeneration.from_pretrained(name, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(name)
        if not processor.chat_template:
            raise ValueError(f"the processor in {name} has no chat_template; the caption prompt is built with it")

        # 3. Identity for caption versions: a hub id as is, a local directory by its name (not its location)
        display_name = Path(name).name if Path(name).is_dir() else name
        return cls(model, processor, display_name, config_hash(config, processor.chat_template))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def version_spec(self, prompt: str = DEFAULT_PROMPT, generation: GenerationParams | dict | None = None) -> dict:
        """Everything that determines this captioner's output for `prompt` and `generation`, as plain data.

        `storage.captions.CaptionVersion(**spec)` turns it into a caption version (its id hashes this).
        """
        generation = GenerationParams.model_validate(generation or {})
        return {
            "model": self.name,
            "model_config_hash": self.config_hash,
            "prompt": prompt,
            "generation": generation.effective(),
        }

    def chat_prompt(self, prompt: str) -> str:
        """The model's input text for one image and `prompt`, by the processor's chat template."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.no_grad()
    def caption(
        self,
        images: list[Image.Image],
        prompt: str = DEFAULT_PROMPT,
        generation: GenerationParams | dict | None = None,
    ) -> list[CaptionResult]:
        """One caption per image, generated as one left-padded batch.

        When sampling, the torch seed is set to `generation.seed` at the start of the call (the global RNG
        state is restored afterwards), so the same images in the same batch give the same captions.
        """
        # 1. Check inputs
        generation = GenerationParams.model_validate(generation or {})
        if not isinstance(images, list | tuple) or not all(isinstance(i, Image.Image) for i in images):
            raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
        if not images:
            return []

        # 2. Encode the batch: every row is the same chat prompt with one image, left-padded
        text = [self.chat_prompt(prompt)] * len(images)
        rgb = [image.convert("RGB") for image in images]
        inputs = self.processor(images=rgb, text=text, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device).to(self.dtype)  # casts only the floating-point pixel_values
        prompt_length = inputs["input_ids"].shape[1]  # (N, L) after left padding

        # 3. Generate
        options = {
            "max_new_tokens": generation.max_new_tokens,
            "do_sample": generation.do_sample,
            "num_beams": generation.num_beams,
            "repetition_penalty": generation.repetition_penalty,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if generation.do_sample:
            options |= {"temperature": generation.temperature, "top_p": generation.top_p}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(generation.seed)
            out = self.model.generate(**inputs, **options)  # (N, L + new), new <= max_new_tokens
        new_tokens = out[:, prompt_length:]  # (N, new)

        # 4. Decode the new tokens only; count them without EOS and padding
        captions = [c.strip() for c in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        special = torch.tensor(self.processor.tokenizer.all_special_ids, device=new_tokens.device)
        counts = (~torch.isin(new_tokens, special)).sum(dim=1)  # (N,)
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=new_tokens.device)
        ended = torch.isin(new_tokens, eos).any(dim=1)  # (N,)
        hit_cap = new_tokens.shape[1] >= generation.max_new_tokens
        return [
            CaptionResult(text=c, tokens=int(n), truncated=hit_cap and not bool(e))
            for c, n, e in zip(captions, counts, ended, strict=True)
        ]


def config_hash(config: dict, chat_template: str | None) -> str:
    """16 hex digits of sha256 over the model's config.json (volatile keys removed) and its chat template.

    Together with the model name this identifies a captioner for caption versions, without hashing the
    weights (14 GB for LLaVA-1.5-7B): the name pins the weights, the hash catches a changed architecture,
    special tokens or prompt template under the same name.
    """

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
        return value

    payload = json.dumps({"config": strip(config), "chat_template": chat_template}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
