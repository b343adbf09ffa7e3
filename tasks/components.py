"""Where the frozen models are, and each loaded once per worker process.

`resolve_components` turns the config into loadable names: hub ids or directories as given, or the tiny random
components built (once, under a lock) in <workdir>/components/<recipe>. The loaders below keep what they loaded for the
life of the process: a Ray worker that runs many shards of a stage loads T5 or LLaVA once, not once per shard.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch

from storage.fs import filesystem, join
from tasks.config import ComponentsConfig
from tasks.locks import is_local, locked


@dataclass(frozen=True)
class Components:
    """Loadable names (hub id or local directory) of each component, and the latent codec's arguments."""

    t5: str
    vae: str
    llava: str
    codec: dict  # keyword arguments of models.pixel_codec.build_latent_codec

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_components(config: ComponentsConfig, workdir: str) -> Components:
    """The components to load; tiny ones are built in <workdir>/components/<recipe> first (or reused if built)."""
    t5, vae, llava = config.t5, config.vae, config.llava
    if config.tiny:
        from models.tiny import build_tiny_components

        directory = join(workdir, "components", config.tiny_build().replace(",", "-"))  # one per build recipe
        if not is_local(directory):
            raise ValueError(f"components.tiny needs a local workdir to build them in; workdir={workdir!r} is remote")
        with locked(directory):  # two runs must not build into the same directory at once
            tiny = build_tiny_components(
                filesystem(directory)[1], seed=config.tiny_seed, t5_d_model=config.tiny_t5_d_model
            )
        t5, vae, llava = str(tiny.t5_dir), str(tiny.vae_dir), str(tiny.llava_dir)
    if config.codec == "pixel":
        codec = {"kind": "pixel", "factor": config.pixel_factor, "scaling_factor": config.pixel_scaling_factor}
    else:
        codec = {"kind": "vae", "vae": vae}
    return Components(t5=t5, vae=vae, llava=llava, codec=codec)


def device() -> str:
    """The GPU Ray assigned this task (CUDA_VISIBLE_DEVICES), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def text_encoder(name: str, on: str):
    from models.text_encoder import T5TextEncoder

    return T5TextEncoder.from_pretrained(name, device=on)


@functools.cache
def _codec(spec_json: str, on: str):
    from models.pixel_codec import build_latent_codec

    return build_latent_codec(**json.loads(spec_json), device=on)


def latent_codec(spec: dict, on: str):
    return _codec(json.dumps(spec, sort_keys=True), on)


@functools.cache
def captioner(name: str, on: str):
    from models.captioner import LlavaCaptioner

    return LlavaCaptioner.from_pretrained(name, device=on)
