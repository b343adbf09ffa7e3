"""Ablations of the PixArt-alpha recipe at CPU scale: does each idea improve text-image alignment on shapes?

1. stage1    stage 2 from scratch vs from stage 1: a class-conditional DiT on the 40 (shape, colour) classes,
             re-parameterised into PixArt (models.stages.build_stage2, the paper's adaLN-single section); its
             stage 1 is paid from the same budget;
2. adaln     adaLN-single vs DiT's per-block adaLN (PixArt(adaln="block")): parameters and alignment;
3. captions  dense vs sparse training captions; evaluation always uses the dense held-out prompts.

Every arm trains in-process (models.training.Trainer) for the same budget (optimiser steps x batch) on the same
data, seed and schedule, and is evaluated every --eval-every steps on held-out prompts (models.evaluate: the
per-category accuracy with its 95% Wilson interval) and by its held-out denoising loss: the MSE of the network's
prediction (epsilon or v) on renders of held-out scenes (combinations never trained on, dense captions) at fixed,
stratified timesteps and fixed noise, the same for every arm. At CPU budgets the samples may not yet be judged
right in any category, while the held-out loss already separates the arms: it is the figure that resolves small
budgets. The reference
arm (from scratch, adaLN-single, dense captions) is shared by the three ablations and trained once. Each
ablation ends with two verdicts computed from the final figures (alignment, held-out loss); "overall" is the
mean over categories, and its 95% band is a normal approximation over the per-category binomials (images of one
prompt are not independent, so it is a little narrow).

Outputs in --out: ablation.md, ablation.json, ablation.png; each arm's last evaluation (report.md, grid per
category) is in its directory under --out/store. The data (ingest + features) and every finished arm are cached
there: a re-run with the same settings only does what is missing, and adding an ablation trains only its arm.

The defaults are a quick run (a few minutes). The scale of the CPU demo's experiments (of the order of 1.5-2 h
on 2 shared cores: ~0.7 s per training step, ~0.6 s per judged image):

    python benchmarks/ablation.py --steps 1500 --eval-every 250 --batch 32 --model-depth 4 --hidden 192 \\
        --heads 3 --lr 1e-3 --per-category 10 --images-per-prompt 2 --count 2048 --threads 2 --out /tmp/ablation
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from models.diffusion import create_diffusion
from models.dit import DiT
from models.evaluate import EvalReport, evaluate
from models.judge import CATEGORY_ATTRIBUTES
from models.pixart import PixArt, build_pixart
from models.pixel_codec import PixelCodec
from models.stages import StageModelConfig, build_stage2
from models.text_encoder import T5TextEncoder
from models.tiny import build_tiny_components
from models.training.config import OptimizerConfig, TrainConfig
from models.training.trainer import Trainer
from storage.artifacts import Artifact, ArtifactStore
from storage.features import extract_features
from storage.fs import write_json
from storage.ingest import ingest
from storage.loader import LoaderConfig, build_loader
from storage.sources.shapes import NUM_CLASSES, ShapesConfig, ShapesSource, heldout_prompts

PIXEL_FACTOR = 2  # pixel codec: 32 px images -> 16 x 16 x 12 latents, 64 tokens at patch 2
SAMPLING_STEPS = 20  # DPM-Solver++ steps, as PixArt-alpha samples
HELDOUT_COUNT = 256  # held-out scenes in the held-out loss
HELDOUT_BATCH = 64
Z95 = 1.959964

# ---------------------------------------------------------------------------------------------------
#                                    Settings, arms, ablations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationConfig:
    """Everything that determines the results; the defaults are the quick run."""

    steps: int = 200  # optimiser steps of every arm: the budget, with the batch (stage 1 included)
    eval_every: int = 100  # steps between evaluations (and one at the end)
    batch: int = 16  # global batch of every step
    depth: int = 2  # transformer blocks (DiT and PixArt alike)
    hidden: int = 96  # hidden size D (divisible by 4 for the sin-cos positions, and by heads)
    heads: int = 3  # attention heads
    lr: float = 1e-3  # AdamW learning rate, not scaled with the batch
    warmup: int = 20  # linear warm-up steps of each stage's optimiser
    ema_decay: float = 0.995  # the EMA weights are evaluated; 0 evaluates the raw weights
    stage1_fraction: float = 0.25  # share of the from-stage-1 arm's budget spent on stage 1
    images_per_prompt: int = 1  # images sampled per held-out prompt
    per_category: int = 4  # held-out prompts per category
    cfg_scale: float = 4.5  # classifier-free guidance of the evaluation samples
    count: int = 512  # shapes images in the training set
    image_size: int = 32  # their side in pixels
    textures: bool = True  # striped / dotted objects, and the texture category
    layout_jitter: float = 1.0  # 1: objects anywhere they fit; 0: the canonical layout the prompt implies
    prediction_type: str = "epsilon"  # what the networks predict: epsilon (the paper) or v_prediction
    timestep_sampling: str = "uniform"  # how training draws t: uniform (the paper) or logit_normal
    grad_clip: float = 0.01  # max gradient norm (the paper's 0.01)
    seed: int = 0  # weights, noise, timesteps, data order and sampling noise (the data set itself is fixed)

    @property
    def stage1_steps(self) -> int:
        return round(self.stage1_fraction * self.steps)

    def eval_steps(self) -> list[int]:
        return sorted({*range(self.eval_every, self.steps, self.eval_every), self.steps})


@dataclass(frozen=True)
class Arm:
    """One training run. Arms differ from the reference in one thing."""

    name: str
    description: str
    adaln: Literal["single", "block"] = "single"
    caption_style: Literal["dense", "sparse"] = "dense"
    from_stage1: bool = False


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("reference", "stage 2 from scratch, adaLN-single, dense captions"),
        Arm("from_stage1", "stage 1 (class-conditional DiT) re-parameterised, then stage 2", from_stage1=True),
        Arm("per_block_adaln", "from scratch with DiT's per-block adaLN", adaln="block"),
        Arm("sparse_captions", "from scratch on sparse captions (shapes and relation only)", caption_style="sparse"),
    )
}


@dataclass(frozen=True)
class Ablation:
    """Two arms and the paper's claim about them: `claimed` is better than `other`, or no worse than it."""

    title: str
    claimed: str
    other: str
    kind: Literal["better", "no worse"]
    labels: dict[str, str]  # arm -> its name in this ablation


ABLATIONS: dict[str, Ablation] = {
    "stage1": Ablation(
        "stage 2 from scratch vs from stage 1",
        "from_stage1",
        "reference",
        "better",
        {"from_stage1": "from stage 1", "reference": "from scratch"},
    ),
    "adaln": Ablation(
        "adaLN-single vs per-block adaLN",
        "reference",
        "per_block_adaln",
        "no worse",
        {"reference": "adaLN-single", "per_block_adaln": "per-block adaLN"},
    ),
    "captions": Ablation(
        "dense vs sparse captions",
        "reference",
        "sparse_captions",
        "better",
        {"reference": "dense captions", "sparse_captions": "sparse captions"},
    ),
}

# ---------------------------------------------------------------------------------------------------
#                                             Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class EvalPoint:
    """One evaluation of an arm."""

    step: int  # optimiser steps the arm has spent, stage 1 included
    loss: float | None  # mean training loss since the previous point (stage 1's right after re-parameterisation)
    overall: float  # mean accuracy over categories
    overall_se: float  # its standard error (see `overall_se`)
    categories: dict[str, dict]  # category -> accuracy, ci_low, ci_high, correct, num_images
    heldout_mse: float | None = None  # prediction MSE on held-out scenes (see `heldout_mse`)
    heldout_mse_se: float | None = None  # its standard error over the held-out samples
    heldout_values: list[float] | None = None  # per held-out sample: same draws in every arm, so paired


@dataclass
class ArmResult:
    arm: str
    description: str
    parameters: int  # of the PixArt that is evaluated
    stage1_parameters: int | None  # of the stage-1 DiT
    stage1_steps: int
    train_seconds: float
    eval_seconds: float
    points: list[EvalPoint]

    @classmethod
    def from_dict(cls, d: dict) -> ArmResult:
        return cls(**{**d, "points": [EvalPoint(**p) for p in d["points"]]})


def overall_se(report: EvalReport) -> float:
    """Standard error of the mean over categories, each accuracy a binomial proportion. (k + 1) / (n + 2) in the
    variance keeps a category at 0 or 1 from claiming no uncertainty at all (Agresti-Coull style)."""
    variance = 0.0
    for c in report.categories.values():
        p = (c.correct + 1) / (c.num_images + 2)
        variance += p * (1 - p) / c.num_images
    return math.sqrt(variance) / max(len(report.categories), 1)


def eval_point(report: EvalReport, step: int, loss: float | None, mse: tuple[float, float, list]) -> EvalPoint:
    keys = ("accuracy", "ci_low", "ci_high", "correct", "num_images")
    categories = {name: {k: getattr(c, k) for k in keys} for name, c in report.categories.items()}
    return EvalPoint(step, loss, report.overall, overall_se(report), categories, *mse)


@torch.no_grad()
def heldout_mse(model: PixArt, batches: list[dict], seed: int) -> tuple[float, float, list[float]]:
    """(mean, standard error, per-sample values) of the prediction MSE per held-out sample: timesteps stratified over
    [0, T) and noise drawn from (seed, batch), so every arm and every step sees the same draws."""
    diffusion = create_diffusion(learn_sigma=model.pred_sigma, prediction_type=model.prediction_type)
    was_training = model.training
    model.eval()  # no caption dropout
    values = []
    for b, batch in enumerate(batches):
        x0 = batch["x"].float()  # (N, C, H, W)
        n = x0.shape[0]
        g = torch.Generator().manual_seed(seed * 10_000 + b)
        t = ((torch.arange(n) + torch.rand(n, generator=g)) * diffusion.num_timesteps / n).long()  # (N,)
        noise = torch.randn(x0.shape, generator=g)
        losses = diffusion.training_losses(model, x0, t, {"y": batch["y"], "mask": batch["mask"]}, noise)
        values.append(losses["mse"])
    model.train(was_training)
    v = torch.cat(values)
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item(), [round(x, 6) for x in v.tolist()]


# ---------------------------------------------------------------------------------------------------
#                                       Data and one arm
# ---------------------------------------------------------------------------------------------------


def shapes_config(config: AblationConfig, caption_style: str = "dense") -> ShapesConfig:
    return ShapesConfig(
        count=config.count,
        image_size=config.image_size,
        textures=config.textures,
        layout_jitter=config.layout_jitter,
        caption_style=caption_style,
    )


def heldout_shapes(config: AblationConfig) -> ShapesConfig:
    """Scenes with at least one held-out combination, dense captions, another seed than the training set."""
    return shapes_config(config).model_copy(update={"split": "heldout", "count": HELDOUT_COUNT, "seed": 1})


def heldout_batches(features: Artifact, seed: int) -> list[dict]:
    """The held-out features as fixed batches (one epoch, in order)."""
    loader = LoaderConfig(num_workers=0, shuffle_buffer=1, batch_size=HELDOUT_BATCH, seed=seed, epochs=1)
    return list(build_loader(features, loader))


def prepare_features(
    config: AblationConfig,
    caption_style: str,
    store: ArtifactStore,
    t5: T5TextEncoder,
    codec: PixelCodec,
    shapes: ShapesConfig | None = None,
) -> Artifact:
    """Shapes images (default: the training set) and their features (pixel latents, tiny-T5 captions); reused
    when already complete."""
    shapes = shapes or shapes_config(config, caption_style)
    images = store.artifact("ingest", {"shapes": shapes.model_dump()})
    if not images.complete:
        ingest(ShapesSource(shapes), images, samples_per_shard=256, progress=False)
    spec = {"codec": "pixel", "factor": PIXEL_FACTOR, "text_encoder": f"tiny T5, d_model {t5.d_model}"}
    features = store.artifact("features", spec, upstream=[images.id])
    if not features.complete:
        extract_features(images, features, t5, codec, base_resolution=config.image_size, progress=False)
    return features


def train_config(config: AblationConfig, steps: int) -> TrainConfig:
    optimizer = OptimizerConfig(lr=config.lr, warmup_steps=config.warmup, lr_scaling="none", grad_clip=config.grad_clip)
    return TrainConfig(
        steps=steps,
        global_batch_size=config.batch,
        seed=config.seed,
        ema_decay=config.ema_decay,
        optimizer=optimizer,
        timestep_sampling=config.timestep_sampling,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_arm(
    arm: Arm,
    config: AblationConfig,
    features: Artifact,
    heldout: list[dict],
    t5: T5TextEncoder,
    codec: PixelCodec,
    out: Path,
) -> ArmResult:
    """Train one arm for the budget, evaluating at config.eval_steps() (and right after stage 1)."""
    latent, channels = config.image_size // PIXEL_FACTOR, 3 * PIXEL_FACTOR**2
    loader = LoaderConfig(num_workers=0, shuffle_buffer=512, batch_size=config.batch, seed=config.seed)
    prompts = heldout_prompts(shapes_config(config), config.per_category)  # always the dense held-out prompts
    torch.manual_seed(config.seed)
    points: list[EvalPoint] = []
    train_seconds = eval_seconds = 0.0

    def evaluate_at(model: PixArt, step: int, loss: float | None) -> None:
        """Judge samples of `model`; the last evaluation also writes its report and sample grids to `out`."""
        nonlocal eval_seconds
        start = time.perf_counter()
        report = evaluate(
            model,
            t5,
            codec,
            prompts,
            images_per_prompt=config.images_per_prompt,
            seed=config.seed,
            steps=SAMPLING_STEPS,
            cfg_scale=config.cfg_scale,
            out_dir=out / f"samples_step_{step}" if step == config.steps else None,
        )
        mse = heldout_mse(model, heldout, config.seed)
        eval_seconds += time.perf_counter() - start
        points.append(eval_point(report, step, loss, mse))
        scores = " ".join(f"{k} {c.accuracy:.2f}" for k, c in report.categories.items())
        shown = "-" if loss is None else f"{loss:.4f}"
        print(
            f"  [{arm.name}] step {step}/{config.steps}  loss {shown}  held-out mse {mse[0]:.4f}  "
            f"overall {report.overall:.3f}  ({scores})"
        )

    # 1. Stage 1 (the from-stage-1 arm): a class-conditional DiT, re-parameterised into PixArt at t = 500
    stage1_steps = config.stage1_steps if arm.from_stage1 else 0
    stage1_parameters = None
    size = dict(  # DiT and PixArt alike
        input_size=latent,
        patch_size=2,
        in_channels=channels,
        hidden_size=config.hidden,
        depth=config.depth,
        num_heads=config.heads,
        prediction_type=config.prediction_type,
    )
    if arm.from_stage1:
        dit = DiT(**size, num_classes=NUM_CLASSES)
        stage1_parameters = count_parameters(dit)
        stage1 = Trainer(dit, train_config(config, stage1_steps))
        summary = stage1.fit(iter(build_loader(features, loader)), until_step=stage1_steps)
        train_seconds += summary.wall_seconds
        stage2_config = StageModelConfig(
            stage=2,
            input_size=latent,
            in_channels=channels,
            caption_channels=t5.d_model,
            prediction_type=config.prediction_type,
        )
        model, reparam = build_stage2(stage2_config, stage1=stage1.ema)
        print(f"  [{arm.name}] stage 1: {stage1_steps} steps; {reparam.summary()}")
    else:
        model = PixArt(**size, caption_channels=t5.d_model, lewei_scale=1.0, adaln=arm.adaln)

    # 2. Stage 2: train to each evaluation step of the budget
    trainer = Trainer(model, train_config(config, config.steps - stage1_steps))
    if arm.from_stage1:
        evaluate_at(trainer.ema, stage1_steps, sum(summary.losses) / len(summary.losses))
    batches = iter(build_loader(features, loader))
    for step in (s for s in config.eval_steps() if s > stage1_steps):
        summary = trainer.fit(batches, until_step=step - stage1_steps)
        train_seconds += summary.wall_seconds
        evaluate_at(trainer.ema, step, sum(summary.losses) / len(summary.losses))
    return ArmResult(
        arm=arm.name,
        description=arm.description,
        parameters=count_parameters(model),
        stage1_parameters=stage1_parameters,
        stage1_steps=stage1_steps,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        points=points,
    )


# ---------------------------------------------------------------------------------------------------
#                                     Verdicts and the report
# ---------------------------------------------------------------------------------------------------


def verdict(ablation: Ablation, results: dict[str, ArmResult], budget: int) -> str:
    """One line from the final scores: does the claimed arm beat (or match) the other beyond the noise?"""
    claimed, other = results[ablation.claimed], results[ablation.other]
    a, b = claimed.points[-1], other.points[-1]
    name_a, name_b = ablation.labels[ablation.claimed], ablation.labels[ablation.other]
    diff, noise = a.overall - b.overall, Z95 * math.hypot(a.overall_se, b.overall_se)
    figures = f"final overall {a.overall:.3f} vs {b.overall:.3f}, difference {diff:+.3f} ± {noise:.3f} (95%)"
    if a.overall == 0 and b.overall == 0:
        return f"not testable at this budget: both arms score 0 on every held-out category ({figures})"
    if ablation.kind == "no worse":
        fewer = 1 - claimed.parameters / other.parameters
        params = f"{claimed.parameters:,} vs {other.parameters:,} parameters ({fewer:.1%} fewer)"
        if diff > noise:
            return f"claim holds here: {name_a} ahead of {name_b} beyond the noise, with {params}; {figures}"
        if diff >= -noise:
            return f"consistent with the claim: {name_a} not behind {name_b} beyond the noise, with {params}; {figures}"
        return f"claim contradicted here: {name_b} ahead of {name_a} beyond the noise ({params}); {figures}"
    if b.overall > 0:
        reached = next((p.step for p in claimed.points if p.overall >= b.overall), None)
        if reached is None:
            pace = f"{name_a} never reaches the final score of {name_b} ({b.overall:.3f})"
        else:
            pace = (
                f"{name_a} first reaches the final score of {name_b} ({b.overall:.3f}) at step {reached} "
                f"({reached / budget:.0%} of the budget)"
            )
    else:
        pace = f"{name_b} scores 0 at the end"
    if diff > noise:
        return f"claim reproduced: {name_a} ahead beyond the noise; {pace}; {figures}"
    if diff < -noise:
        return f"claim contradicted here: {name_b} ahead beyond the noise; {pace}; {figures}"
    return f"claim not resolved at this budget (difference within the noise): {pace}; {figures}"


def loss_verdict(ablation: Ablation, results: dict[str, ArmResult], budget: int) -> str:
    """One line from the final held-out losses (lower is better): the claimed arm ahead, level or behind."""
    claimed, other = results[ablation.claimed], results[ablation.other]
    a, b = claimed.points[-1], other.points[-1]
    name_a, name_b = ablation.labels[ablation.claimed], ablation.labels[ablation.other]
    gain, noise = b.heldout_mse - a.heldout_mse, Z95 * math.hypot(a.heldout_mse_se, b.heldout_mse_se)
    if a.heldout_values and b.heldout_values:  # the same (sample, t, noise) in both arms: the paired error
        diffs = torch.tensor(b.heldout_values) - torch.tensor(a.heldout_values)
        noise = Z95 * (diffs.std() / math.sqrt(len(diffs))).item()
    figures = f"final {a.heldout_mse:.4f} vs {b.heldout_mse:.4f}, {name_a} lower by {gain:+.4f} ± {noise:.4f} (95%)"
    reached = next((p.step for p in claimed.points if p.heldout_mse <= b.heldout_mse), None)
    pace = (
        f"{name_a} reaches {name_b}'s final loss at step {reached} ({reached / budget:.0%} of the budget)"
        if reached is not None
        else f"{name_a} never reaches {name_b}'s final loss"
    )
    if gain > noise:
        holds = "claim holds here" if ablation.kind == "no worse" else "claim reproduced"
        return f"{holds}: {name_a} lower beyond the noise; {pace}; {figures}"
    if gain < -noise:
        return f"claim contradicted here: {name_b} lower beyond the noise; {pace}; {figures}"
    if ablation.kind == "no worse":
        return f"consistent with the claim: level within the noise; {figures}"
    return f"claim not resolved (within the noise); {pace}; {figures}"


def xl_parameters() -> dict[str, int]:
    """Parameter counts at PixArt-XL/2 (built on the meta device: no memory), for the adaLN ablation."""
    counts = {}
    for adaln in ("single", "block"):
        with torch.device("meta"):
            counts[adaln] = count_parameters(build_pixart("PixArt-XL/2", adaln=adaln))
    return counts


def _cell(category: dict) -> str:
    return f"{category['accuracy']:.2f} [{category['ci_low']:.2f}, {category['ci_high']:.2f}]"


def markdown(config: AblationConfig, selected: list[str], results: dict[str, ArmResult], summary: dict) -> str:
    present = next(iter(results.values())).points[-1].categories
    categories = [c for c in CATEGORY_ATTRIBUTES if c in present]  # the judge's order, also for reused arms
    lines = [
        "# Ablations of the PixArt-α recipe at CPU scale",
        "",
        f"Budget per arm: {config.steps} optimiser steps x batch {config.batch}; PixArt depth {config.depth}, hidden "
        f"{config.hidden}, {config.heads} heads, lr {config.lr}, gradient clip {config.grad_clip}, EMA "
        f"{config.ema_decay}; {config.prediction_type} prediction, {config.timestep_sampling} timesteps; "
        f"{config.count} shapes images at {config.image_size} px (layout jitter {config.layout_jitter}, textures "
        f"{'on' if config.textures else 'off'}; pixel codec f={PIXEL_FACTOR}, tiny T5); evaluation on "
        f"{config.per_category} held-out prompts per category x {config.images_per_prompt} images, DPM-Solver "
        f"{SAMPLING_STEPS} steps, cfg {config.cfg_scale}; seed {config.seed}.",
        "",
        "## Verdicts",
        "",
    ]
    for name in selected:
        lines += [
            f"- **{ABLATIONS[name].title}**: alignment: {summary[name]['verdict']}",
            f"  held-out loss: {summary[name]['loss_verdict']}",
        ]
    if "adaln" in selected:
        xl = summary["adaln"]["xl_parameters"]
        lines.append(
            f"- At PixArt-XL/2: adaLN-single {xl['single']:,} vs per-block adaLN {xl['block']:,} parameters "
            f"({1 - xl['single'] / xl['block']:.1%} fewer; the paper: about 26%)."
        )
    lines += [
        "",
        "## Arms",
        "",
        "| arm | what | parameters | stage-1 steps | train s | eval s | final overall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        params = f"{r.parameters:,}" + (f" (DiT {r.stage1_parameters:,})" if r.stage1_parameters else "")
        final = r.points[-1]
        lines.append(
            f"| {r.arm} | {r.description} | {params} | {r.stage1_steps} | {r.train_seconds:.0f} | "
            f"{r.eval_seconds:.0f} | {final.overall:.3f} ± {Z95 * final.overall_se:.3f} |"
        )
    lines += ["", "## Alignment vs training steps", "", "Accuracy [95% Wilson interval] per held-out category.", ""]
    for name in selected:
        ablation = ABLATIONS[name]
        lines += [
            f"### {ablation.title}",
            "",
            "| arm | step | loss | held-out mse | overall | " + " | ".join(categories) + " |",
            "|---" * (5 + len(categories)) + "|",
        ]
        for arm in (ablation.claimed, ablation.other):
            for p in results[arm].points:
                loss = "" if p.loss is None else f"{p.loss:.4f}"
                cells = [_cell(p.categories[c]) if c in p.categories else "" for c in categories]
                mse = "" if p.heldout_mse is None else f"{p.heldout_mse:.4f} ± {Z95 * p.heldout_mse_se:.4f}"
                lines.append(
                    f"| {ablation.labels[arm]} | {p.step} | {loss} | {mse} | "
                    f"{p.overall:.3f} ± {Z95 * p.overall_se:.3f} | " + " | ".join(cells) + " |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(config: AblationConfig, selected: list[str], results: dict[str, ArmResult], path: Path) -> None:
    """Per ablation (columns): overall alignment (top) and held-out loss (bottom) vs optimiser steps, 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(selected), figsize=(5 * len(selected), 7.5), squeeze=False)
    for column, name in enumerate(selected):
        ablation = ABLATIONS[name]
        top, bottom = axes[0][column], axes[1][column]
        for arm in (ablation.claimed, ablation.other):
            points = results[arm].points
            steps = [p.step for p in points]
            color = "C0" if arm == "reference" else "C1"  # the reference arm in one colour in every panel
            for ax, value, se, clip in (
                (top, [p.overall for p in points], [p.overall_se for p in points], (0.0, 1.0)),
                (bottom, [p.heldout_mse for p in points], [p.heldout_mse_se for p in points], (0.0, math.inf)),
            ):
                ax.plot(steps, value, marker="o", color=color, label=ablation.labels[arm])
                low = [max(clip[0], v - Z95 * e) for v, e in zip(value, se, strict=True)]
                high = [min(clip[1], v + Z95 * e) for v, e in zip(value, se, strict=True)]
                ax.fill_between(steps, low, high, color=color, alpha=0.15)
        for ax in (top, bottom):
            if name == "stage1":
                ax.axvline(config.stage1_steps, color="gray", linestyle=":", label="stage 1 -> 2")
            ax.set_xlabel(f"optimiser steps (batch {config.batch})")
            ax.set_xlim(0, config.steps)
            ax.legend()
        top.set_title(ablation.title)
        top.set_ylabel("held-out alignment (mean over categories)")
        top.set_ylim(0, 1)
        bottom.set_ylabel("held-out epsilon MSE (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
#                                              Main
# ---------------------------------------------------------------------------------------------------


def run(config: AblationConfig, selected: list[str], out: Path, tiny_dir: Path | None = None) -> dict:
    """Train and evaluate the arms the selected ablations need; write the table, JSON and plot; return the JSON."""
    # 1. Check inputs
    unknown = [name for name in selected if name not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablations {unknown}; choose from {list(ABLATIONS)}")
    if "stage1" in selected and not 0 < config.stage1_steps < config.steps:
        raise ValueError(
            f"stage1_fraction={config.stage1_fraction} of steps={config.steps} gives {config.stage1_steps} stage-1 "
            "steps; the from-stage-1 arm needs at least one step of each stage"
        )
    if not 0 < config.eval_every <= config.steps:
        raise ValueError(f"eval_every={config.eval_every}: expected 1 <= eval_every <= steps={config.steps}")

    # 2. Data: images and features per caption style the arms need (cached in <out>/store)
    out.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(str(out / "store"))
    tiny = build_tiny_components(tiny_dir or out / "tiny")
    t5 = T5TextEncoder.from_pretrained(tiny.t5_dir)
    codec = PixelCodec(factor=PIXEL_FACTOR)
    wanted = {arm for name in selected for arm in (ABLATIONS[name].claimed, ABLATIONS[name].other)}
    arms = [arm for arm in ARMS.values() if arm.name in wanted]  # the reference arm once
    start = time.perf_counter()
    features = {style: prepare_features(config, style, store, t5, codec) for style in {a.caption_style for a in arms}}
    heldout = heldout_batches(prepare_features(config, "dense", store, t5, codec, heldout_shapes(config)), config.seed)
    print(f"data: {', '.join(f'{s} {f.id}' for s, f in features.items())} ({time.perf_counter() - start:.1f} s)")

    # 3. Arms: each trained once, or read back from its artifact
    results: dict[str, ArmResult] = {}
    settings = {f.name: getattr(config, f.name) for f in fields(config)}
    for arm in arms:
        own = {k: v for k, v in settings.items() if arm.from_stage1 or k != "stage1_fraction"}
        identity = {"arm": asdict(arm), "settings": own}
        artifact = store.artifact("ablation_arm", identity, upstream=[features[arm.caption_style].id])
        if artifact.complete:
            results[arm.name] = ArmResult.from_dict(artifact.manifest["summary"])
            print(f"[{arm.name}] reused {artifact.id}")
            continue
        print(f"[{arm.name}] {arm.description}")
        result = run_arm(arm, config, features[arm.caption_style], heldout, t5, codec, Path(artifact.url))
        artifact.finish(summary=asdict(result), shards=[])
        results[arm.name] = result

    # 4. Verdicts, table, JSON, plot
    summary: dict[str, dict] = {}
    for name in selected:
        ablation = ABLATIONS[name]
        summary[name] = {
            **asdict(ablation),
            "verdict": verdict(ablation, results, config.steps),
            "loss_verdict": loss_verdict(ablation, results, config.steps),
        }
        if name == "adaln":
            summary[name]["xl_parameters"] = xl_parameters()
    report = {"settings": settings, "ablations": summary, "arms": {k: asdict(v) for k, v in results.items()}}
    table = markdown(config, selected, results, summary)
    (out / "ablation.md").write_text(table + "\n")
    write_json(str(out / "ablation.json"), report)
    plot(config, selected, results, out / "ablation.png")
    print()
    print(table)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = AblationConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ablations", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS), help="which to run (default: all)"
    )
    parser.add_argument("--steps", type=int, default=d.steps, help="optimiser steps per arm, stage 1 included")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations")
    parser.add_argument("--batch", type=int, default=d.batch, help="batch size of every step")
    parser.add_argument("--model-depth", type=int, default=d.depth, help="transformer blocks")
    parser.add_argument("--hidden", type=int, default=d.hidden, help="hidden size (divisible by 4 and by --heads)")
    parser.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (not scaled with the batch)")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps of each stage")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA evaluated; 0: the raw weights")
    parser.add_argument(
        "--stage1-fraction", type=float, default=d.stage1_fraction, help="budget share of stage 1 (from-stage-1 arm)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt, help="samples per prompt")
    parser.add_argument("--per-category", type=int, default=d.per_category, help="held-out prompts per category")
    parser.add_argument("--cfg-scale", type=float, default=d.cfg_scale, help="guidance scale of the samples")
    parser.add_argument("--count", type=int, default=d.count, help="shapes images in the training set")
    parser.add_argument("--no-textures", action="store_true", help="plain objects only (no texture category)")
    parser.add_argument(
        "--layout-jitter", type=float, default=d.layout_jitter, help="0: canonical layouts; 1: anywhere they fit"
    )
    parser.add_argument(
        "--prediction-type", choices=["epsilon", "v_prediction"], default=d.prediction_type, help="network target"
    )
    parser.add_argument(
        "--timestep-sampling", choices=["uniform", "logit_normal"], default=d.timestep_sampling, help="training t"
    )
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds weights, noise, data order and sampling")
    parser.add_argument("--out", type=Path, default=Path("ablation_out"), help="outputs and the data / arm cache")
    parser.add_argument("--tiny-dir", type=Path, default=None, help="tiny T5 build to reuse (default: OUT/tiny)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = AblationConfig(
        steps=args.steps,
        eval_every=args.eval_every,
        batch=args.batch,
        depth=args.model_depth,
        hidden=args.hidden,
        heads=args.heads,
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        stage1_fraction=args.stage1_fraction,
        images_per_prompt=args.images_per_prompt,
        per_category=args.per_category,
        cfg_scale=args.cfg_scale,
        count=args.count,
        textures=not args.no_textures,
        layout_jitter=args.layout_jitter,
        prediction_type=args.prediction_type,
        timestep_sampling=args.timestep_sampling,
        grad_clip=args.grad_clip,
        seed=args.seed,
    )
    return run(config, args.ablations, args.out, args.tiny_dir)


if __name__ == "__main__":
    main()
