"""The pipeline's one typed config: a sub-config per stage, loaded from a YAML preset with `a.b=c` overrides.

    PipelineConfig
      workdir, until, ray                       where artifacts go, where to stop, which Ray cluster
      components                                T5, VAE (or the pixel codec), LLaVA: hub ids, or tiny local ones
      ingest, caption, extract                  the data stages (shard-parallel on Ray)
      stage1, stage2, stage3                    the paper's training stages (tasks.ray_train.StageRunConfig)
      export, sample, evaluate                  the diffusers export, the held-out sample grid, the evaluation

Presets live in `configs/`; a preset names the preset it derives from with `base:` and overrides fields of it,
so nothing is copied (top-level `x-...` keys only hold YAML anchors shared by the stages and are dropped).
`load_config("demo", ["stage1.train.steps=20"])` reads `configs/demo.yaml` (and its bases), applies the
overrides and validates; an unknown or bad field is reported with its dotted path.

Each stage's *identity* (what its artifact id hashes) is the part of its config that changes its output; how
it runs (resources, batch sizes of inference, the Ray address) is not part of it, so changing those reuses
every artifact.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema

from configs import PRESET_DIR
from models.captioner import DEFAULT_LLAVA, DEFAULT_PROMPT, GenerationParams
from models.diffusion.samplers import Sampler
from models.metrics import MetricsConfig
from models.stages import StageModelConfig
from models.text_encoder import DEFAULT_T5
from models.training.config import TrainConfig
from models.vae import DEFAULT_VAE
from storage.captions import Flag
from storage.fs import absolute, is_url
from storage.images import ImageRules
from storage.sources.folder import FolderConfig
from storage.sources.img2dataset import Img2DatasetConfig
from storage.sources.sa1b import SA1BConfig
from storage.sources.shapes import CATEGORIES, ShapesConfig, parse_caption
from tasks.ray_train import StageRunConfig

PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))  # the names `base` and `-c` take
STEPS = ("ingest", "caption", "extract", "stage1", "stage2", "stage3", "export", "sample", "evaluate")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------------------------------
#                                     Execution: Ray and resources
# ---------------------------------------------------------------------------------------------------


class Resources(Strict):
    """What Ray reserves for each task of a stage (one shard, or the whole stage for export / sampling)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task (fractions share a GPU between tasks).")


class RayConfig(Strict):
    address: str | None = Field(
        None,
        description="Ray cluster: 'auto' inside one, 'ray://head:10001' from outside, 'HOST:PORT' of a head; None: "
        "$RAY_ADDRESS if set (deploy/start_local.sh sets it for its worker), else a local instance.",
    )
    num_cpus: int | None = Field(None, ge=1, description="Local instance only: CPUs it offers (default: all).")
    object_store_mb: int = Field(200, ge=50, description="Local instance only: object store size in MB.")
    dashboard: bool = Field(
        True,
        description="Local instance only: start Ray's dashboard. It also serves the State API that Ray Train uses "
        "to release a finished run's placement group; without it those linger and Ray logs a warning every second.",
    )

    def resolved_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def init_kwargs(self) -> dict:
        """ray.init keyword arguments (a cluster's resources are its own: only the address is passed)."""
        address = self.resolved_address()
        if address == "auto":  # prefect-ray passes any other address to ray.init itself
            return {"address": "auto"}
        if address:
            return {}
        kwargs = {"include_dashboard": self.dashboard, "object_store_memory": self.object_store_mb * 2**20}
        return kwargs | ({"num_cpus": self.num_cpus} if self.num_cpus else {})


# ---------------------------------------------------------------------------------------------------
#                                     External models
# ---------------------------------------------------------------------------------------------------


class ComponentsConfig(Strict):
    """The frozen models the pipeline uses, by hub id or local directory; or tiny random ones built locally."""

    tiny: bool = Field(
        False,
        description="Build tiny random T5 / VAE / LLaVA under `<workdir>/components/<recipe>` and use them instead of "
        "t5 / vae / llava (the CPU demo and tests; nothing is downloaded).",
    )
    tiny_seed: int = Field(0, description="Seed of the tiny components' random weights.")
    tiny_t5_d_model: int = Field(32, ge=8, description="Width of the tiny T5 (the models' caption_channels).")
    t5: str = Field(DEFAULT_T5, description="T5 encoder: hub id or directory (T5 v1.1 XXL in the paper).")
    vae: str = Field(DEFAULT_VAE, description="VAE: hub id or directory (sd-vae-ft-ema in the paper).")
    llava: str = Field(DEFAULT_LLAVA, description="LLaVA captioner: hub id or directory (LLaVA-1.5 7B).")
    codec: Literal["vae", "pixel"] = Field(
        "vae", description="Latent space: the VAE, or the exact weightless pixel codec (CPU demo)."
    )
    pixel_factor: int = Field(4, ge=1, description="Pixel codec: pixels folded per side (4 -> 48 channels).")
    pixel_scaling_factor: float = Field(1.0, gt=0, description="Pixel codec: latent scaling factor.")

    def name(self, component: Literal["t5", "vae", "llava"]) -> str:
        """What identifies a component in artifact ids: its hub id or directory, or the tiny build recipe."""
        if self.tiny:
            return f"tiny-{component}({self.tiny_build()})"
        return getattr(self, component)

    def tiny_build(self) -> str:
        """The tiny build's recipe as "format_version=2,seed=0,t5_d_model=32": in artifact ids and its directory."""
        from models.tiny import tiny_recipe

        return ",".join(f"{k}={v}" for k, v in tiny_recipe(self.tiny_seed, self.tiny_t5_d_model).items())

    def codec_identity(self) -> dict:
        if self.codec == "pixel":
            return {"kind": "pixel", "factor": self.pixel_factor, "scaling_factor": self.pixel_scaling_factor}
        return {"kind": "vae", "vae": self.name("vae")}


# ---------------------------------------------------------------------------------------------------
#                                     Data stages
# ---------------------------------------------------------------------------------------------------


class ShapesSourceConfig(ShapesConfig):
    """The synthetic shapes (storage.sources.shapes) as an ingest source."""

    kind: Literal["shapes"] = "shapes"


SourceConfig = Annotated[
    ShapesSourceConfig | FolderConfig | SA1BConfig | Img2DatasetConfig, Field(discriminator="kind")
]


class IngestConfig(Strict):
    source: SourceConfig = Field(default_factory=ShapesSourceConfig, description="Where images come from (kind).")
    samples_per_shard: int = Field(1000, ge=1, description="Samples per WebDataset shard (the unit of parallelism).")
    rules: ImageRules = Field(default_factory=ImageRules, description="What images are accepted.")
    resources: Resources = Field(default_factory=Resources, description="Per shard task.")

    def identity(self) -> dict:
        return self.model_dump(mode="json", exclude={"resources"})


class CaptionConfig(Strict):
    enabled: bool = Field(True, description="Recaption the images with LLaVA (a new caption version per prompt).")
    prompt: str = Field(DEFAULT_PROMPT, description="The captioning prompt (the paper's SAM prompt by default).")
    generation: GenerationParams = Field(default_factory=GenerationParams, description="Decoding parameters.")
    batch_size: int = Field(8, ge=1, description="Images per generate call.")
    use: Literal["sidecar", "llava", "mix"] = Field(
        "llava",
        description="Which caption trains: the source's own, LLaVA's (sidecar where a LLaVA caption is flagged), "
        "or a per-sample mix.",
    )
    mix_prob: float = Field(0.5, ge=0, le=1, description="mix: probability of the LLaVA caption.")
    mix_seed: int = Field(0, description="mix: seeds the per-sample draw.")
    reject_flags: tuple[Flag, ...] = Field(
        ("empty", "repetition", "prompt_echo", "undecodable"),
        description="LLaVA captions with any of these quality flags are not trained on.",
    )
    resources: Resources = Field(default_factory=Resources, description="Per shard task (LLaVA-7B: a GPU).")

    def identity(self, components: ComponentsConfig) -> dict:
        """The caption artifact: model, prompt and decoding (the caption version's id adds the model config)."""
        return {
            "model": components.name("llava"),
            "prompt": self.prompt,
            "generation": self.generation.effective(),
        }

    def choice_identity(self) -> dict:
        """What of the caption choice changes the features (nothing of LLaVA when training on sidecar captions)."""
        if self.use == "sidecar":
            return {"use": "sidecar"}
        return self.model_dump(mode="json", include={"use", "mix_prob", "mix_seed", "reject_flags"})


class ExtractConfig(Strict):
    batch_size: int = Field(32, ge=1, description="Images (of one aspect-ratio bucket) per encoder call.")
    resources: Resources = Field(default_factory=Resources, description="Per shard task (T5-XXL: a GPU).")


# ---------------------------------------------------------------------------------------------------
#                                     Export, samples and evaluation
# ---------------------------------------------------------------------------------------------------


class ExportConfig(Strict):
    enabled: bool = Field(True, description="Export the last stage's EMA model as a diffusers directory.")
    resources: Resources = Field(default_factory=Resources)


class SampleConfig(Strict):
    enabled: bool = Field(True, description="Sample a grid of held-out prompts from the exported model.")
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts of the grid; empty: the shapes source's held-out prompts (per_category of each).",
    )
    per_category: int = Field(2, ge=1, description="Held-out prompts per T2I-CompBench category.")
    steps: int = Field(20, ge=1, description="DPM-Solver++ steps.")
    cfg_scale: float = Field(4.5, ge=1, description="Classifier-free guidance scale.")
    seed: int = Field(0, description="Seed of the initial noise.")
    resources: Resources = Field(default_factory=Resources)

    def identity(self, prompts: list[str]) -> dict:
        return {"prompts": prompts, "steps": self.steps, "cfg_scale": self.cfg_scale, "seed": self.seed}


class EvaluateConfig(Strict):
    """The compositional evaluation (models.evaluate): held-out shapes prompts, judged exactly, per category."""

    enabled: bool = Field(
        True,
        description="Evaluate the exported model. It needs prompts in the shapes grammar: the shapes source's "
        "held-out ones, or `prompts`; a pipeline on another source without `prompts` skips it (and logs why).",
    )
    prompts: dict[str, list[str]] = Field(
        default_factory=dict,
        description="{category: prompts} to evaluate instead of the shapes source's held-out prompts: categories "
        f"of {list(CATEGORIES)}, prompts dense captions of the shapes grammar ('a large red circle above a "
        "small blue square on a gray background').",
    )
    per_category: int = Field(10, ge=1, description="Held-out prompts per category (when `prompts` is empty).")
    images_per_prompt: int = Field(4, ge=1, description="Images sampled per prompt (each from its own noise).")
    sampler: Sampler = Field("dpm-solver", description="DPM-Solver++ 2M (the paper's), DDIM or IDDPM ancestral.")
    steps: int = Field(20, ge=1, description="Sampler steps (the paper: 20 DPM-Solver++ steps).")
    cfg_scale: float = Field(4.5, ge=1, description="Classifier-free guidance scale (the paper: 4.5).")
    seed: int = Field(0, description="Seed of the initial noise (batch b draws from (seed, b)).")
    batch_size: int = Field(16, ge=1, description="Images per sampler call; with the seed, it fixes the noise.")
    metrics: MetricsConfig | None = Field(
        None,
        description="FID and CLIP score besides the judge (their weights by local path or hub id); None: judge only. "
        "Missing weights skip a metric with the reason in the report, never fail the run. A skipped metric is "
        "part of a complete evaluation: change a metrics field (e.g. fid_weights) to compute it once weights exist.",
    )
    resources: Resources = Field(default_factory=Resources)

    @field_validator("prompts")
    @classmethod
    def _prompts_are_judgeable(cls, prompts: dict[str, list[str]]) -> dict[str, list[str]]:
        for category, texts in prompts.items():
            if category not in CATEGORIES:
                raise ValueError(f"unknown category {category!r}; expected one of {list(CATEGORIES)}")
            for text in texts:
                parse_caption(text)  # raises naming the prompt outside the grammar
        return prompts

    def identity(self, prompts: list[tuple[str, str]]) -> dict:
        """What the evaluation's output depends on: the (category, prompt) pairs and how images are drawn."""
        return {
            "prompts": [list(p) for p in prompts],
            **self.model_dump(
                mode="json",
                include={"images_per_prompt", "sampler", "steps", "cfg_scale", "seed", "batch_size", "metrics"},
            ),
        }


# ---------------------------------------------------------------------------------------------------
#                                     The pipeline
# ---------------------------------------------------------------------------------------------------


def _stage(n: int, input_size: int, steps: int, batch: int) -> StageRunConfig:
    return StageRunConfig(
        model=StageModelConfig(stage=n, input_size=input_size),
        train=TrainConfig(steps=steps, global_batch_size=batch),
    )


class PipelineConfig(Strict):
    """ingest -> caption -> extract -> stage 1 -> 2 -> 3 -> export -> sample, evaluate: one sub-config per step."""

    base: Annotated[
        str | None,
        # A run's parameters name a preset (the form offers them); from Python, a YAML path works as well.
        WithJsonSchema({"anyOf": [{"type": "string", "enum": list(PRESETS)}, {"type": "null"}]}),
    ] = Field(
        None,
        description="Preset this config derives from (configs/); the fields given here override it. A "
        "deployment's form already holds every field of its preset, so another preset means another deployment "
        "(or `--param config='{\"base\": ...}'` with only the fields to change).",
    )
    workdir: str = Field("workdir", description="Artifact store root: a local directory or an fsspec URL.")
    until: Literal[STEPS] = Field("evaluate", description="Last step to run (earlier ones run or are reused).")
    ray: RayConfig = Field(default_factory=RayConfig)
    components: ComponentsConfig = Field(default_factory=ComponentsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    stage1: StageRunConfig = Field(default_factory=lambda: _stage(1, 32, 1000, 256))
    stage2: StageRunConfig = Field(default_factory=lambda: _stage(2, 32, 1000, 256))
    stage3: StageRunConfig = Field(default_factory=lambda: _stage(3, 32, 1000, 256))
    export: ExportConfig = Field(default_factory=ExportConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="before")
    @classmethod
    def _derive_from_base(cls, data: Any) -> Any:
        """`{"base": "demo", "stage1": {...}}` -> the preset's fields, overridden by the ones given."""
        if isinstance(data, dict) and data.get("base"):
            path = resolve_preset(data["base"])
            data = deep_merge(read_preset(path), {**data, "base": str(path)})
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        """The schema Prefect checks a run's parameters against (and renders as the UI's form): a field may be
        left out at any depth, since `base` fills it in (`{"base": "demo", "stage2": {"train": {"steps": 5}}}`)."""
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        _drop_required(handler.resolve_ref_schema(schema), handler.resolve_ref_schema, set())
        return schema

    @model_validator(mode="after")
    def _absolute_paths(self) -> PipelineConfig:
        """Every local path made absolute once, here: Ray tasks, Ray Train workers and Prefect workers run in
        other directories than the one the config was loaded in (URLs and hub ids stay as they are)."""
        self.workdir = absolute(self.workdir)
        source = self.ingest.source
        if source.kind != "shapes":
            source.path = absolute(source.path)
        if source.kind == "sa1b" and source.captions:
            source.captions = absolute(source.captions)
        for name in ("t5", "vae", "llava"):
            setattr(self.components, name, local_or_hub_id(getattr(self.components, name)))
        for n in (1, 2, 3):
            if init := self.stage(n).model.init:
                self.stage(n).model.init = local_or_hub_id(init)
        if metrics := self.evaluate.metrics:
            metrics.fid_weights = metrics.fid_weights and absolute(metrics.fid_weights)
            metrics.clip_model = local_or_hub_id(metrics.clip_model)
        return self

    @model_validator(mode="after")
    def _captions_exist(self) -> PipelineConfig:
        if self.caption.use != "sidecar" and not self.caption.enabled:
            raise ValueError(
                f"caption.use={self.caption.use!r} trains on LLaVA captions, but caption.enabled is false: "
                "enable captioning or set caption.use='sidecar'"
            )
        return self

    def features_identity(self, resolution: int) -> dict:
        """What a feature artifact's content depends on: encoders, resolution, and which captions are encoded."""
        return {
            "t5": self.components.name("t5"),
            "codec": self.components.codec_identity(),
            "base_resolution": resolution,
            "captions": self.caption.choice_identity(),
        }

    def export_identity(self) -> dict:
        return {"t5": self.components.name("t5"), "codec": self.components.codec_identity()}

    def stage(self, n: int) -> StageRunConfig:
        if n not in (1, 2, 3):
            raise ValueError(f"stage={n}; expected 1, 2 or 3")
        return getattr(self, f"stage{n}")

    def runs(self, step: str) -> bool:
        """True if `step` is at or before `until`."""
        return STEPS.index(step) <= STEPS.index(self.until)


def local_or_hub_id(name: str) -> str:
    """A model named by a local path (one that exists, or is written as a path: ./x, ../x, /x, ~/x) made
    absolute; a hub id ("google/t5-v1_1-xxl") or URL as it is, as `from_pretrained` would read it."""
    if is_url(name) or not (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))):
        return name
    return absolute(name)


def _drop_required(schema: dict, resolve, seen: set[int]) -> None:
    """Make every field of `schema` and of the object schemas below it optional. A tagged union (a source, told
    apart by `kind`) becomes `anyOf`, so that a source given in part matches without naming its kind
    (`{"count": 8}`: `base`'s source fills in the rest). `resolve` follows `$ref`s."""
    if "$ref" in schema:
        schema = resolve(schema)
    if id(schema) in seen:
        return
    seen.add(id(schema))
    schema.pop("required", None)
    if schema.pop("discriminator", None):
        schema["anyOf"] = schema.pop("oneOf")
    children = [*schema.get("properties", {}).values(), *schema.get("anyOf", []), *schema.get("oneOf", [])]
    children += [schema[key] for key in ("items", "additionalProperties") if isinstance(schema.get(key), dict)]
    for child in children:
        _drop_required(child, resolve, seen)


# ---------------------------------------------------------------------------------------------------
#                                     Presets and overrides
# ---------------------------------------------------------------------------------------------------


def resolve_preset(name: str | Path, relative_to: Path | None = None) -> Path:
    """A preset file: a path (absolute, relative to `relative_to` or the working directory) or a name in configs/."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates += [PRESET_DIR / str(name), PRESET_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(f"config {str(name)!r} not found: pass a YAML file or one of the presets {list(PRESETS)}")


def read_preset(path: Path) -> dict:
    """A preset's fields with its `base` chain merged in (the derived file's fields win)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of fields, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}  # anchors for reuse within the file
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = resolve_preset(base, relative_to=path.parent)
    if base_path == path:
        raise ValueError(f"{path} names itself as its base")
    return deep_merge(read_preset(base_path), data)


def expand_preset(name: str) -> dict:
    """Preset `name` with every field spelled out, as a deployment's `config` parameter: the UI's form then shows
    (and a run from it sends) the preset's values rather than the schema's defaults. Fields the preset sets keep
    the value as written: a relative path resolves where the flow runs, not where it was deployed."""
    if name not in PRESETS:
        raise ValueError(f"base={name!r} is not a preset; choose one of {list(PRESETS)}")
    written = read_preset(resolve_preset(name))
    full = load_config(written).model_dump(mode="json", exclude={"base"})
    return {"base": name, **deep_merge(full, written)}


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`, recursively for nested mappings; lists and values are replaced, and so is a
    mapping of another `kind` (a shapes source does not inherit an SA-1B source's path)."""
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        merge = (
            isinstance(value, dict) and isinstance(old, dict) and value.get("kind", old.get("kind")) == old.get("kind")
        )
        out[key] = deep_merge(old, value) if merge else value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'stage1.train.steps=20' -> (['stage1', 'train', 'steps'], 20); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. stage1.train.steps=20")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def check_path(path: list[str], model: type[BaseModel] = PipelineConfig) -> None:
    """Raise naming the first part of a dotted path that the config schema does not have."""
    for i, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(path[:i]) or "the pipeline config"
            raise ValueError(
                f"unknown setting {'.'.join(path)!r}: {where} has no field {part!r}; fields: {list(fields)}"
            )
        model = _model_of(fields[part].annotation)
        if model is None:  # a plain value, dict or list: nothing below it to check
            return


def _model_of(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def check_keys(data: dict, model: type[BaseModel] = PipelineConfig, prefix: list[str] | None = None) -> None:
    """check_path for every key of a nested mapping (the lead's stage configs ignore unknown fields silently)."""
    for key, value in data.items():
        path = [*(prefix or []), key]
        check_path(path)
        sub = _model_of(_field_annotation(path))
        if sub is not None and isinstance(value, dict):
            check_keys(value, sub, path)


def _field_annotation(path: list[str]):
    model: type[BaseModel] = PipelineConfig
    annotation = None
    for part in path:
        annotation = model.model_fields[part].annotation
        model = _model_of(annotation) or model
    return annotation


def load_config(preset: str | Path | dict | None = None, overrides: list[str] = (), **fields) -> PipelineConfig:
    """A validated PipelineConfig from a preset (file, name or mapping), `KEY=VALUE` overrides and fields.

    Raises ValueError naming the field for an unknown key or an invalid value.
    """
    data: dict = {}
    if isinstance(preset, dict):
        data = dict(preset)
    elif preset is not None:
        data = read_preset(resolve_preset(preset))
    for text in overrides:
        path, value = parse_override(text)
        check_path(path)
        data = deep_merge(data, functools.reduce(lambda inner, key: {key: inner}, reversed(path), value))
    data = deep_merge(data, fields)
    check_keys({k: v for k, v in data.items() if k != "base"})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(describe_errors(err)) from None


def describe_errors(err: ValidationError) -> str:
    """One line per problem: `stage1.train.steps: Input should be greater than 0 (got -5)`."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        got = f" (got {e['input']!r})" if not isinstance(e.get("input"), dict | list) else ""
        lines.append(f"{where}: {e['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)
