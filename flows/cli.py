"""`pixart`: the command line of the PixArt-alpha pipeline.

Every command is a thin shell over the flows and `models/`: it parses, calls, reports. Errors a user can fix
(a missing file, a bad config value, a checkpoint that does not fit) print what to fix and exit 1.

    pixart demo                                    the whole pipeline on the CPU, tiny components, minutes
    pixart run FLOW -c CONFIG [--set a.b=c ...]    one flow: ingest, caption, extract, train, evaluate, pipeline
    pixart deploy                                  the deployments of prefect.yaml, on a running server
    pixart generate "PROMPT" --model DIR --out FILE.png
    pixart artifacts ls | gc                       what the workdir holds; delete what no config needs
    pixart server start | stop | status            the workdir's local Prefect server (commands start it)
    pixart export ... | pixart convert ...         checkpoints to diffusers and back
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]

app = typer.Typer(
    help="PixArt-alpha training recipe as a resumable Prefect + Ray pipeline: run it, deploy it, sample from it, "
    "convert and export checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
convert_app = typer.Typer(
    help="Convert checkpoints between the official PixArt/DiT layouts and diffusers.", no_args_is_help=True
)
artifacts_app = typer.Typer(help="List or garbage-collect the artifacts in a workdir.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
app.add_typer(artifacts_app, name="artifacts")
server_app = typer.Typer(
    help="The workdir's local Prefect server: commands start it when no PREFECT_API_URL is set, and it stays up.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")
console = Console(stderr=True, soft_wrap=True)  # one error per line, never folded


def user_errors(fn):
    """Turn the errors a user can fix into red lines and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as err:
            console.print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from err
        except RuntimeError as err:
            from flows.server import ServerFailed
            from tasks.execution import ShardsFailed  # imported late: `--help` must not wait for torch

            if not isinstance(err, ShardsFailed | ServerFailed):
                raise
            console.print(f"[red]error:[/red] {err}", highlight=False)
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


# ---------------------------------------------------------------------------------------------------
#                                     Running the pipeline
# ---------------------------------------------------------------------------------------------------

ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help="Preset name in configs/ (demo, demo_long, pixart_256, pixart_512, pixart_1024_ms) or a YAML file.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: --set stage1.train.steps=20 (value read as YAML; repeatable)."),
]
WorkdirOption = Annotated[
    str | None, typer.Option(help="Artifact store root (a directory or fsspec URL); default: the config's workdir.")
]


def build_config(config: str, overrides: list[str] | None, workdir: str | None):
    from tasks.config import load_config

    return load_config(config, overrides or [], **({"workdir": workdir} if workdir else {}))


def print_reports(reports) -> None:
    table = Table(title="steps")
    for column in ("step", "status", "seconds", "artifact"):
        table.add_column(column)
    for r in reports:
        table.add_row(r.step, r.status, f"{r.seconds:.1f}", r.artifact)
    console.print(table)


def print_evaluation(summary: dict) -> None:
    from flows.report import evaluation_line

    console.print(evaluation_line(summary), highlight=False)


def print_pipeline(summary: dict) -> None:
    from flows.report import StageReport

    steps = [StageReport(**s) for s in summary["steps"]]
    print_reports(steps)
    outputs = {s.step: s.summary for s in steps}
    if "export" in outputs:
        export = outputs["export"]
        console.print(
            f"export ({export['kind']}): {export['dir']}  (max |ours - exported| {export['max_abs_diff_vs_model']:.1e})"
        )
    if "samples" in outputs:
        console.print(f"held-out sample grid: {outputs['samples']['grid']}")
    if "evaluation" in outputs:
        print_evaluation(outputs["evaluation"])
    console.print(f"run summary: {summary['path']}  ({summary['seconds']:.1f} s)")


@app.command()
@user_errors
def run(
    flow: Annotated[str, typer.Argument(help="ingest | caption | extract | train | evaluate | pipeline")],
    config: ConfigOption,
    set_: SetOption = None,
    workdir: WorkdirOption = None,
    stage: Annotated[
        int, typer.Option(min=1, max=3, help="train only: the stage, 1, 2 or 3 (earlier ones run or are reused).")
    ] = 1,
    model: Annotated[
        str | None,
        typer.Option(
            help="evaluate only: the model to judge on held-out prompts: an artifact id of the workdir (export-..., "
            "stage3-...), an export or stage directory, or a checkpoint (default: the config's export, run or reused)."
        ),
    ] = None,
):
    """Run one flow (and whatever it needs upstream) on a config; complete artifacts are reused."""
    from flows.runtime import FLOWS, run_flow

    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; expected one of {list(FLOWS)}")
    if model is not None and flow != "evaluate":
        raise ValueError(f"--model names the model `pixart run evaluate` judges; flow {flow!r} takes none")
    result = run_flow(flow, build_config(config, set_, workdir), stage=stage, model=model)
    if flow == "evaluate":
        print_reports([result])
        print_evaluation(result.summary)
    elif flow == "pipeline":
        print_pipeline(result)
    else:
        print_reports(result.values() if isinstance(result, dict) else [result])


@app.command()
@user_errors
def demo(
    workdir: Annotated[str, typer.Option(help="Where artifacts go (the artifact store root).")] = "workdir",
    set_: SetOption = None,
):
    """The whole pipeline on the CPU in minutes: synthetic shapes, tiny T5 / LLaVA, the pixel codec, stages 1-3.

    ingest -> LLaVA captions (a caption version) -> features -> stage 1 -> 2 -> 3 -> diffusers export -> a grid
    of held-out prompts and their evaluation per category. Run it again: every artifact is reused and it finishes
    in seconds.
    """
    from flows.runtime import local_server, run_flow

    config = build_config("demo", set_, workdir)
    print_pipeline(run_flow("pipeline", config))
    if server := local_server(config.workdir):
        console.print(
            f"The Prefect server stays up for the next commands (UI {server.url}: runs, logs and artifacts); "
            f"stop it with `pixart server stop --workdir {config.workdir}`",
            highlight=False,
        )


@app.command()
@user_errors
def deploy(
    pool: Annotated[
        str, typer.Option(help="Process work pool every deployment goes to (created if missing).")
    ] = "pixart-local",
    prefect_file: Annotated[Path, typer.Option(help="Deployment declarations.")] = REPO / "prefect.yaml",
):
    """Register the deployments of prefect.yaml with the Prefect server at PREFECT_API_URL, all on one work pool.

    Each `config: {base: PRESET}` is registered as every field of the preset (what the UI's form shows is what
    runs); a schedule someone switched on or off stays so. Exits 1 naming any deployment the server does not hold
    as asked.
    """
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import deploy as deploy_file

    if not PREFECT_API_URL.value():
        raise ValueError(
            "PREFECT_API_URL is not set: start a server and a worker first (deploy/start_local.sh prints the "
            "export line), or point it at your server"
        )
    if not prefect_file.is_file():
        raise FileNotFoundError(f"{prefect_file} does not exist")
    names = deploy_file(prefect_file, pool)
    console.print(f"{len(names)} deployments on work pool {pool!r}: {', '.join(names)}", highlight=False)


@app.command()
@user_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[Path, typer.Option(help="Export directory, stage directory, diffusers directory or checkpoint.")],
    out: Annotated[Path, typer.Option(help="Output PNG file.")],
    text_encoder: Annotated[str | None, typer.Option(help="T5 directory or hub id (default: the model's).")] = None,
    vae: Annotated[str | None, typer.Option(help="VAE directory or hub id (default: the model's).")] = None,
    pixel_factor: Annotated[int | None, typer.Option(help="Decode with the pixel codec of this factor.")] = None,
    steps: Annotated[int, typer.Option(help="DPM-Solver++ steps.")] = 20,
    cfg_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.5,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    height: Annotated[int | None, typer.Option(help="Pixels (default: the model's trained size).")] = None,
    width: Annotated[int | None, typer.Option(help="Pixels (default: the model's trained size).")] = None,
):
    """Sample one image for PROMPT from a trained or exported model."""
    from models.grid import to_grid
    from tasks.export import load_exported
    from tasks.sample import generate_images

    if vae and pixel_factor:
        raise ValueError("pass --vae or --pixel-factor, not both")
    codec = {"kind": "pixel", "factor": pixel_factor} if pixel_factor else {"kind": "vae", "vae": vae} if vae else None
    net, encoder, latent_codec, negative = load_exported(model, text_encoder, codec)
    images = generate_images(net, encoder, latent_codec, [prompt], height=height, width=width, steps=steps,
                             cfg_scale=cfg_scale, seed=seed, negative=negative)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    to_grid(images, rows=1, pad=0).save(out)
    console.print(f"wrote {out} ({images.shape[-1]}x{images.shape[-2]})")


# ---------------------------------------------------------------------------------------------------
#                                     Artifacts
# ---------------------------------------------------------------------------------------------------


def config_steps(configs: list[str], overrides: list[str] | None, workdir: str | None) -> dict[str, str]:
    """{artifact id: "CONFIG STEP"} of every step of each config, read as `run` reads it (overrides included)."""
    from flows.pipeline import planned_ids

    named = {}
    for name in configs:
        for step, aid in planned_ids(build_config(name, overrides, workdir)).items():
            named.setdefault(aid, f"{name} {step}")
    return named


def store_root(configs: list[str], overrides: list[str] | None, workdir: str | None) -> str:
    """The workdir `run` would use: --workdir, else the (first) config's, else ./workdir."""
    if workdir or not configs:
        return workdir or "workdir"
    return build_config(configs[0], overrides, None).workdir


ConfigsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--config", "-c", help="A preset name or YAML file, as `run` takes it (repeatable); --set applies to each."
    ),
]


@artifacts_app.command("ls")
@user_errors
def artifacts_ls(
    config: ConfigsOption = None,
    set_: SetOption = None,
    workdir: Annotated[str | None, typer.Option(help="Artifact store root; default: the config's workdir.")] = None,
):
    """List the artifacts: id, stage, complete or not, shards, size; with -c, which step of the config each is."""
    from storage.artifacts import ArtifactStore
    from tasks.locks import is_locked

    store = ArtifactStore(store_root(config or [], set_, workdir))
    named = config_steps(config or [], set_, store.root)
    table = Table(title=f"artifacts in {store.root}")
    for column in ("id", "stage", "complete", "shards", "MB", "step" if config else "", "in use"):
        if column:
            table.add_column(column)
    for a in store.ls():
        row = [a.id, a.stage, "yes" if a.complete else "no", str(a.shards), f"{a.bytes / 1e6:.1f}"]
        row += [named.get(a.id, "")] if config else []
        table.add_row(*row, "locked" if is_locked(store.get(a.id).url) else "")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: whole ids, never folded


@artifacts_app.command("gc")
@user_errors
def artifacts_gc(
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Keep every artifact of this config, read as `run` reads it (repeatable)."),
    ] = None,
    set_: SetOption = None,
    workdir: Annotated[str | None, typer.Option(help="Artifact store root; default: the config's workdir.")] = None,
    keep: Annotated[list[str] | None, typer.Option(help="Keep this artifact id (and its upstream).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only list what would be deleted.")] = False,
):
    """Delete every artifact that no kept config or id needs (upstream artifacts of kept ones are kept).

    Give the config exactly as the runs that built the artifacts were given it (`-c demo --set
    stage2.train.steps=500`): each kept artifact is listed with the step or id that keeps it.
    """
    from storage.artifacts import ArtifactStore
    from tasks.locks import is_locked

    if not config and not keep:
        raise ValueError("name what to keep: -c CONFIG (its artifacts) and/or --keep ID; everything else is deleted")
    store = ArtifactStore(store_root(config or [], set_, workdir))
    why = config_steps(config or [], set_, store.root) | {aid: "--keep" for aid in keep or []}
    why |= {aid: "in use by a running step" for aid in store.ids() if is_locked(store.get(aid).url)}
    live = store.reachable(why)
    dead = store.gc(live, dry_run=dry_run)
    for aid, root in sorted(live.items()):
        console.print(f"keep {aid}: {why[aid] if aid == root else f'upstream of {root} ({why[root]})'}")
    verb = "would delete" if dry_run else "deleted"
    for aid in dead:
        console.print(f"{verb} {aid}")
    console.print(f"{verb} {len(dead)} artifacts, kept {len(live)}")


# ---------------------------------------------------------------------------------------------------
#                                     The local Prefect server
# ---------------------------------------------------------------------------------------------------

ServerWorkdirOption = Annotated[
    str, typer.Option(help="The local workdir whose server it is (state in WORKDIR/.server, or $PIXART_SERVER_HOME).")
]


def local_server_home(workdir: str) -> Path:
    from flows.server import HOME_ENV, server_home

    if (home := server_home(workdir)) is None:
        raise ValueError(f"workdir {workdir} is not local: set {HOME_ENV} to where its server keeps its state")
    return home


def print_server(record, home: Path) -> None:
    print(f"url       {record.url}\napi       {record.api_url}\npid       {record.pid}\nuptime    {record.uptime()}")
    print(f"database  {record.database}\nlog       {record.log}\nstate     {home}")


@server_app.command("start")
@user_errors
def server_start(
    workdir: ServerWorkdirOption = "workdir",
    port: Annotated[
        int | None, typer.Option(help="Port on 127.0.0.1 (default: $PIXART_SERVER_PORT, or a free one).")
    ] = None,
):
    """Start the workdir's Prefect server on loopback (if it is not running) and leave it running."""
    from flows.server import ensure_server

    home = local_server_home(workdir)
    record, started = ensure_server(home, port)
    console.print(f"{'started' if started else 'already running'}: Prefect UI at {record.url}", highlight=False)
    print_server(record, home)


@server_app.command("stop")
@user_errors
def server_stop(workdir: ServerWorkdirOption = "workdir"):
    """Stop the workdir's Prefect server (its database stays: the next start shows the same history)."""
    from flows.server import stop_server

    home = local_server_home(workdir)
    record = stop_server(home)
    console.print(f"stopped the server at {record.url} (pid {record.pid})" if record else f"no server running ({home})",
                  highlight=False)  # fmt: skip


@server_app.command("status")
@user_errors
def server_status(workdir: ServerWorkdirOption = "workdir"):
    """Print the workdir's server (url, pid, uptime, database); exit 1 if none is running."""
    from flows.server import running_server

    home = local_server_home(workdir)
    if (record := running_server(home)) is None:
        console.print(f"no server running ({home}); `pixart server start` starts one", highlight=False)
        raise typer.Exit(1)
    print_server(record, home)


if __name__ == "__main__":
    app()
