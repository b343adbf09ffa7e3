"""T5 text encoder: captions -> (N, 120, C) token features and their (N, 120) mask, as PixArt-alpha uses them.

PixArt-alpha conditions on the last hidden state of the T5 v1.1 XXL encoder (C = d_model = 4096), padded or
truncated to 120 tokens (the reference `T5Embedder`: `padding="max_length", truncation=True,
add_special_tokens=True`). The model and tokenizer are named by a hub id or a local directory and loaded
with transformers' own `from_pretrained`; the tests load a tiny one built by `models.tiny` the same way.

`resolve_pretrained` and `default_dtype` are shared with `models.vae`: one rule for telling a missing local
directory from a hub id, one rule for the device's default precision.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers' model code takes seconds to import: loaded on use (every config imports this)
    from transformers import T5EncoderModel

DEFAULT_T5 = "google/t5-v1_1-xxl"
MAX_LENGTH = 120  # PixArt-alpha's caption length in tokens

# "org/name" or a legacy single name ("t5-small"), as the hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on the CPU; on CUDA bf16 where the GPU supports it, else fp16."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_pretrained(
    id_or_dir: str | os.PathLike, component: str, what: str, subfolder: str | None = None
) -> tuple[str, str | None]:
    """(name for `from_pretrained`, subfolder) of `component` ("text_encoder", "vae", ...) in `id_or_dir`.

    An explicit `subfolder` wins. Otherwise a local directory holding `model_index.json` is a diffusers
    pipeline, whose component is its subfolder, and any other local directory is the component itself; a
    hub id is passed through as the component itself (a hub pipeline needs the explicit `subfolder`).
    A string that is neither an existing path nor shaped like a hub id is a missing directory, reported as
    such rather than as a failed download.
    """
    name = os.fspath(id_or_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        if subfolder is None and (path / "model_index.json").is_file():
            subfolder = component
        config = path / (subfolder or "") / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"{what} directory {path} has no {config.relative_to(path)}: expected a directory written by "
                f"save_pretrained, or a diffusers pipeline directory with a {component}/ subfolder"
            )
        return str(path), subfolder
    if path.exists():
        raise NotADirectoryError(f"{what} {path} is a file; expected a directory written by save_pretrained")
    if not HUB_ID.match(name) or name.startswith((".", "~")):
        raise FileNotFoundError(
            f"{what} directory {name} does not exist; pass a directory written by save_pretrained "
            "or a hub id such as 'org/name'"
        )
    return name, subfolder


class T5TextEncoder:
    """A T5 encoder and its tokenizer, frozen, turning captions into PixArt's cross-attention input."""

    def __init__(self, model: T5EncoderModel, tokenizer, max_length: int = MAX_LENGTH):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike = DEFAULT_T5,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_length: int = MAX_LENGTH,
        subfolder: str | None = None,
    ) -> T5TextEncoder:
        """Load from a hub id, a T5 directory, or a diffusers pipeline directory (text_encoder/, tokenizer/).

        `subfolder` names the text encoder's folder in a hub pipeline (its tokenizer is the sibling
        "tokenizer"); local pipeline directories are recognised by their model_index.json.
        """
        # 1. Find the model and tokenizer folders
        name, model_folder = resolve_pretrained(id_or_dir, "text_encoder", "T5 text encoder", subfolder)
        tokenizer_folder = "tokenizer" if model_folder else None
        config = Path(name) / (model_folder or "") / "config.json"
        if config.is_file() and (model_type := json.loads(config.read_text()).get("model_type")) != "t5":
            raise ValueError(f"{config} has model_type={model_type!r}; expected a T5 encoder ('t5')")

        # 2. Load both through transformers
        from transformers import AutoTokenizer, T5EncoderModel

        dtype = dtype or default_dtype(device)
        model = T5EncoderModel.from_pretrained(name, subfolder=model_folder or "", dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder=tokenizer_folder or "")
        return cls(model, tokenizer, max_length=max_length)

    @property
    def d_model(self) -> int:
        """Feature width C: PixArt's `caption_channels` must equal it (4096 for T5 v1.1 XXL)."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (features (N, L, C) float32, mask (N, L) int64), L = max_length, on `self.device`.

        Every caption ends with EOS and is padded to L; mask is 1 on real tokens (EOS included).
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}: {prompts!r:.80}")
        tokens = self.tokenizer(
            list(prompts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.device)  # (N, L)
        mask = tokens.attention_mask.to(self.device)  # (N, L)
        features = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (N, L, C)
        return features.float(), mask.long()
