"""`pixart`: the command line of the PixArt-alpha pipeline.

Every command is a thin shell over `models/` (and later the Prefect flows): it parses, calls, reports.
Errors a user can fix (a missing file, a checkpoint that does not fit) print one line and exit 1.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="PixArt-alpha training recipe: model conversion, export, and the end-to-end demo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
convert_app = typer.Typer(
    help="Convert checkpoints between the official PixArt/DiT layouts and diffusers.", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")
console = Console(stderr=True, soft_wrap=True)  # one error per line, never folded


def user_errors(fn):
    """Turn the errors a user can fix into one red line and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from err

    return wrapper


@convert_app.command("official-to-diffusers")
@user_errors
def official_to_diffusers(
    src: Annotated[Path, typer.Argument(help="Official PixArt checkpoint (.pth/.pt/.safetensors) or ours.")],
    dst: Annotated[Path, typer.Argument(help="Output directory for a diffusers PixArtTransformer2DModel.")],
    num_heads: Annotated[int | None, typer.Option(help="Attention heads, if not head dim 72.")] = None,
    lewei_scale: Annotated[float | None, typer.Option(help="Position scale if pos_embed is absent.")] = None,
    input_size: Annotated[int | None, typer.Option(help="Latent size if pos_embed is absent.")] = None,
):
    """Official (or our) PixArt checkpoint -> diffusers transformer directory (exact outputs)."""
    from models.convert_pixart import pixart_to_diffusers
    from models.pixart_checkpoint import load_pixart

    overrides = {k: v for k, v in dict(num_heads=num_heads, lewei_scale=lewei_scale, input_size=input_size).items()
                 if v is not None}  # fmt: skip
    model = load_pixart(src, **overrides)
    pixart_to_diffusers(model).save_pretrained(dst)
    console.print(f"wrote diffusers transformer to {dst} ({sum(p.numel() for p in model.parameters()):,} parameters)")


@convert_app.command("diffusers-to-official")
@user_errors
def diffusers_to_official(
    src: Annotated[Path, typer.Argument(help="diffusers transformer or pipeline directory.")],
    dst: Annotated[Path, typer.Argument(help="Output checkpoint file (.pth) in the official key layout.")],
    null_caption: Annotated[
        Path | None,
        typer.Option(help="Tensor file (L, C) for y_embedder.y_embedding; random init and a warning if absent."),
    ] = None,
):
    """diffusers PixArtTransformer2DModel -> official-layout checkpoint loadable by the reference code."""
    import torch

    from models.pixart_checkpoint import load_pixart, save_pixart

    null = torch.load(null_caption, weights_only=True) if null_caption else None
    model = load_pixart(src, null_caption=null)
    save_pixart(model, dst)
    if null is None:
        console.print("[yellow]note:[/yellow] diffusers keeps no null caption; y_embedder.y_embedding is freshly "
                      "initialised (pass --null-caption to set it)")  # fmt: skip
    console.print(f"wrote {dst}")


@convert_app.command("dit-to-pixart")
@user_errors
def dit_to_pixart_cmd(
    dit_ckpt: Annotated[str, typer.Argument(help="DiT checkpoint (.pt), diffusers directory, or hub id.")],
    dst: Annotated[Path, typer.Argument(help="Output PixArt checkpoint (.pth).")],
    t: Annotated[int, typer.Option("--t", help="Timestep at which PixArt's modulation equals DiT's.")] = 500,
    model: Annotated[
        str, typer.Option(help="PixArt preset the DiT must match (sets caption_channels).")
    ] = "PixArt-XL/2",
    t_block_init: Annotated[str, typer.Option(help="'mean' of DiT's adaLN MLPs, or 'normal' (reference).")] = "mean",
    num_heads: Annotated[int | None, typer.Option(help="DiT heads if not a DiT preset size.")] = None,
):
    """Re-parameterise a class-conditional DiT into PixArt (stage 1 -> stage 2 initialisation)."""
    from models.dit import dit_from_checkpoint
    from models.pixart import PIXART_PRESETS
    from models.pixart_checkpoint import save_pixart
    from models.reparam import dit_to_pixart

    if model not in PIXART_PRESETS:
        raise ValueError(f"unknown PixArt preset {model!r}; choose one of {sorted(PIXART_PRESETS)}")
    preset = PIXART_PRESETS[model]
    dit = dit_from_checkpoint(dit_ckpt, num_heads=num_heads)
    pixart, report = dit_to_pixart(
        dit, t=t, caption_channels=preset.get("caption_channels", 4096), t_block_init=t_block_init, preset=model
    )
    save_pixart(pixart, dst, reparam_report=report.__dict__)
    console.print(report.summary())
    console.print(f"wrote {dst}")


@app.command()
@user_errors
def export(
    ckpt: Annotated[Path, typer.Argument(help="PixArt checkpoint (ours or official) or diffusers directory.")],
    to: Annotated[Path, typer.Option("--to", help="Output pipeline directory.")],
    text_encoder: Annotated[str, typer.Option(help="T5 hub id or directory.")] = "google/t5-v1_1-xxl",
    vae: Annotated[str, typer.Option(help="VAE hub id or directory.")] = "stabilityai/sd-vae-ft-ema",
):
    """Export a full diffusers PixArtAlphaPipeline directory (transformer, T5, tokenizer, VAE, DPM-Solver)."""
    from models.export import export_pipeline
    from models.pixart_checkpoint import load_pixart

    out = export_pipeline(load_pixart(ckpt), to, text_encoder=text_encoder, vae=vae)
    console.print(f"wrote {out}: load it with diffusers.PixArtAlphaPipeline.from_pretrained({str(out)!r})")


@app.command()
@user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where components, checkpoints and samples go.")] = Path("workdir"),
    seed: Annotated[int, typer.Option(help="Seed for weights, noise and prompts.")] = 0,
):
    """Run what exists of the pipeline on tiny local components, on the CPU, in seconds."""
    from flows.demo import run_demo

    run_demo(workdir, seed=seed, console=console)


if __name__ == "__main__":
    app()
