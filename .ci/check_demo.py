"""What `make demo` promises, checked from the run summary it wrote (WORKDIR/runs/*.json, the newest):

- every step of the DAG ran or was reused: ingest, caption, features, stages 1-3, export, samples, evaluation;
- the export loads with diffusers' own `from_pretrained` (a PixArtAlphaPipeline, or with the pixel codec the
  PixArtTransformer2DModel and its scheduler) and the transformer runs a forward pass;
- the held-out sample grid is a readable image, the evaluation report exists;
- with --all-reused: the run reused every artifact (the second run of the demo).

    python .ci/check_demo.py workdir [--all-reused]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from PIL import Image

STEPS = ("ingest", "caption", "stage1", "stage2", "stage3", "export", "samples", "evaluation")


def fail(message: str) -> None:
    print(f"check failed: {message}", file=sys.stderr)
    sys.exit(1)


def newest_summary(workdir: Path) -> dict:
    runs = sorted((workdir / "runs").glob("*.json"))  # named by finish time (ISO), so the last is the newest
    if not runs:
        fail(f"no run summary under {workdir / 'runs'}: did the demo run with this workdir?")
    print(f"run summary: {runs[-1]} ({len(runs)} runs recorded)")
    return json.loads(runs[-1].read_text())


def check_export(export: dict) -> None:
    """Load the export the way a diffusers user would, then run the transformer once."""
    root = Path(export["dir"])
    if export["kind"] == "pipeline":
        transformer = PixArtAlphaPipeline.from_pretrained(root).transformer
    else:
        transformer = PixArtTransformer2DModel.from_pretrained(root / "transformer")
        DPMSolverMultistepScheduler.from_pretrained(root / "scheduler")
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    y = torch.randn(1, 4, cfg.caption_channels)
    # micro-conditions (image size in pixels, aspect ratio): read by a multi-scale model, ignored by others
    added = {"resolution": torch.tensor([[256.0, 256.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    with torch.no_grad():
        out = transformer(x, encoder_hidden_states=y, timestep=torch.tensor([500]), added_cond_kwargs=added).sample
    if not torch.isfinite(out).all():
        fail(f"the exported transformer in {root} gives non-finite outputs")
    print(f"export ({export['kind']}) loads with diffusers and runs: {root}, output {tuple(out.shape)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--all-reused", action="store_true", help="Also require every step to have been reused.")
    args = parser.parse_args()

    summary = newest_summary(args.workdir)
    steps = {s["step"]: s for s in summary["steps"]}
    missing = [name for name in STEPS if name not in steps]
    if missing or not any(name.startswith("features-") for name in steps):
        fail(f"steps missing from the run: {missing or ['features-*']}; it ran {list(steps)}")
    if args.all_reused:
        ran = [name for name, s in steps.items() if not s["reused"]]
        if ran:
            fail(f"the second run recomputed {ran}; every artifact should have been reused")
        print(f"all {len(steps)} steps reused in {summary['seconds']:.1f} s")
        return

    check_export(steps["export"]["summary"])
    grid = Path(steps["samples"]["summary"]["grid"])
    with Image.open(grid) as image:
        print(f"sample grid: {grid} ({image.size[0]}x{image.size[1]})")
    report = Path(steps["evaluation"]["summary"]["files"]["markdown"])
    if not report.is_file() or "mean over categories" not in report.read_text():
        fail(f"evaluation report {report} is missing or has no figure per category")
    print(f"evaluation report: {report} (overall {steps['evaluation']['summary']['overall']:.3f})")


if __name__ == "__main__":
    main()
