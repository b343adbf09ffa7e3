"""Read state dicts from disk and load them strictly, with errors that name the offending keys.

Shared by the DiT and PixArt loaders: `read_state_dict` turns a `.pt` / `.pth` / `.bin` / `.safetensors`
file into a flat {name: tensor} dict, `load_state_dict_strict` refuses anything that does not fit exactly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)

# Training scripts save {"model": ..., "ema": ..., "opt": ..., "args": ...}; the weights to sample with are
# the EMA ones when present (as DiT's `find_model` does), then the raw model, then PyTorch's usual wrapper.
WRAPPER_KEYS = ("ema", "model", "state_dict")

# How many keys an error lists per kind before it summarises the rest.
MAX_LISTED = 8


def read_checkpoint(path: str | os.PathLike) -> object:
    """The object stored in a torch or safetensors file, read on the CPU without running code.

    torch files are read with `weights_only=True`; a missing, foreign or corrupt file raises one clear error.
    """
    # 1. Check the file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise ValueError(
            f"checkpoint {path} has suffix {suffix!r}; expected one of {TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}"
        )

    # 2. Read it
    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        # DiT's train.py stores its argparse Namespace under "args": a plain attribute bag, safe to allow.
        # (add_safe_globals rather than the safe_globals context manager: the latter needs torch >= 2.5.)
        torch.serialization.add_safe_globals([argparse.Namespace])
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a corrupt or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err)[:300]}") from err


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a flat {name: tensor} state dict from a torch or safetensors file, on the CPU.

    A dict wrapping the weights is unwrapped: under `key` if given, else under the first of WRAPPER_KEYS.
    """
    obj = read_checkpoint(path)
    return unwrap_state_dict(obj, path, key)


def unwrap_state_dict(obj: object, path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """{"ema": {...}, "opt": ..., ...} -> the flat state dict inside, checked to hold only tensors."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            raise KeyError(f"checkpoint {path} has no entry {key!r}; top-level keys: {_listing(sorted(obj))}")
        obj = obj[key]
    else:
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is not None:
            obj = obj[wrapper]
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"checkpoint {path} is not a flat state dict: entries {_listing(not_tensors)} are not tensors "
            f"(pass key=... to pick the wrapped state dict)"
        )
    return obj


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what="DiT checkpoint"):
    """Load `state_dict` into `module`, raising one ValueError that lists every missing key, every
    unexpected key and every shape mismatch (with both shapes) instead of PyTorch's first complaint."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        listed = _listing([f"{k} {tuple(expected[k].shape)}" for k in missing])
        problems.append(f"{len(missing)} missing key(s): {listed}")
    if unexpected:
        listed = _listing([f"{k} {tuple(state_dict[k].shape)}" for k in unexpected])
        problems.append(f"{len(unexpected)} unexpected key(s): {listed}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + _listing(mismatched))
    if problems:
        raise ValueError(f"{what} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def _listing(items: list[str]) -> str:
    """'a, b, c' with at most MAX_LISTED items and a count of the rest."""
    shown = ", ".join(items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return shown + (f", ... and {rest} more" if rest > 0 else "")
