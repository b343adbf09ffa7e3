"""What a step did, and how a flow run shows it: Prefect table / markdown artifacts, and the run summary.

Every flow run publishes, per step it passes through, a table artifact keyed by the step (`ingest-counts`,
`caption-stats`, `features-32px`, `stage2-training`, `evaluation`, ...), so the Prefect UI keeps each step's
history across runs; the pipeline adds a markdown run summary with the DAG, the artifact ids and where outputs are.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from prefect.artifacts import create_markdown_artifact, create_table_artifact


@dataclass
class StageReport:
    """One step of a run: its artifact, whether it was reused, what ran, how long it took, its manifest summary."""

    step: str  # "ingest", "caption", "features-32px", "stage1", "export", "samples", "evaluation"
    artifact: str  # artifact id
    url: str  # artifact directory
    reused: bool  # complete before this run touched it: nothing ran
    seconds: float
    ran: list[str] = field(default_factory=list)  # shards (or parts) this run computed
    total: int = 0  # shards (or parts) the step has in all
    summary: dict = field(default_factory=dict)  # the artifact manifest's summary

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def status(self) -> str:
        if self.reused:
            return "reused"
        return f"ran {len(self.ran)}/{self.total} shards" if self.total else "ran"


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def metrics_table(report: StageReport, rows: list[tuple[str, object]]) -> list[dict]:
    base = [("artifact", report.artifact), ("status", report.status), ("seconds", round(report.seconds, 2))]
    return [{"metric": k, "value": v if isinstance(v, int | float | str) else str(v)} for k, v in base + rows]


def publish(report: StageReport, key: str, rows: list[tuple[str, object]], description: str) -> None:
    """A table artifact of `rows` (metric, value) under `key`, with the step's artifact, status and time."""
    create_table_artifact(metrics_table(report, rows), key=artifact_key(key), description=description)


def publish_ingest(report: StageReport) -> None:
    s = report.summary
    rows: list[tuple[str, object]] = [
        ("source", s.get("source")),
        ("samples in", s.get("samples_in")),
        ("ingested", s.get("written")),
        ("duplicates", s.get("duplicates")),
        ("quarantined", sum(s.get("quarantined", {}).values())),
    ]
    rows += [(f"quarantined: {reason}", n) for reason, n in sorted(s.get("quarantined", {}).items())]
    rows += [("shards", s.get("shards")), ("MB", round(s.get("bytes", 0) / 1e6, 2))]
    if report.ran and report.seconds:
        rows.append(
            ("images/s", round(s.get("written", 0) * len(report.ran) / max(report.total, 1) / report.seconds, 1))
        )
    publish(report, "ingest-counts", rows, "Ingest: samples in, ingested, duplicates, quarantined by reason")


def publish_caption(report: StageReport) -> None:
    s, stats = report.summary, report.summary.get("stats", {})
    rows: list[tuple[str, object]] = [
        ("caption version", s.get("version")),
        ("version", s.get("label")),
        ("captions", stats.get("count")),
        ("captioned (decodable)", stats.get("captioned")),
        ("mean tokens", round(stats.get("mean_tokens", 0.0), 2)),
        ("mean concept density", round(stats.get("mean_concept_density", 0.0), 2)),
        ("flagged (any)", stats.get("flagged_any")),
    ]
    rows += [(f"flagged: {flag}", n) for flag, n in stats.get("flagged", {}).items()]
    if report.ran and report.seconds:
        rows.append(
            ("images/s", round(stats.get("count", 0) * len(report.ran) / max(report.total, 1) / report.seconds, 1))
        )
    publish(report, "caption-stats", rows, "Captioning: caption version, statistics and quality flags")


def publish_features(report: StageReport) -> None:
    s = report.summary
    rows = [(k, s.get(k)) for k in ("samples", "shards", "codec", "latent_channels", "base_resolution", "t5_channels")]
    if report.ran and report.seconds:
        rows.append(
            ("samples/s", round(s.get("samples", 0) * len(report.ran) / max(report.total, 1) / report.seconds, 1))
        )
    publish(report, report.step, rows, "Feature extraction: T5 features and latents per sample")


def publish_training(report: StageReport) -> None:
    outputs, training = report.summary.get("outputs", {}), report.summary.get("training", {})
    rows = [(k, training.get(k)) for k in ("steps", "samples_seen", "final_loss", "wall_seconds", "device_hours")]
    if training.get("wall_seconds"):
        rows.append(("samples/s", round(training.get("samples_seen", 0) / training["wall_seconds"], 1)))
    rows += [(f"output: {k}", v) for k, v in outputs.items() if k != "grids"]
    rows += [("grid", g) for g in outputs.get("grids", [])]
    publish(report, f"{report.step}-training", rows, f"{report.step}: losses, throughput, checkpoints and grids")


def publish_outputs(report: StageReport, description: str) -> None:
    publish(report, report.step, list(report.summary.items()), description)


def evaluation_rows(summary: dict) -> list[dict]:
    """One row per category (accuracy, 95% Wilson interval, counts, the paper's figure), then the overall mean."""
    rows = [
        {
            "category": c["category"],
            "accuracy": round(c["accuracy"], 4),
            "95% CI": f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}]",
            "correct": f"{c['correct']}/{c['num_images']}",
            "prompts": c["num_prompts"],
            "PixArt-α T2I-CompBench (paper)": "" if c["paper"] is None else c["paper"],
        }
        for c in summary["categories"]
    ]
    overall = {"category": "overall (mean of categories)", "accuracy": round(summary["overall"], 4)}
    overall |= {"95% CI": "", "correct": "", "prompts": "", "PixArt-α T2I-CompBench (paper)": ""}
    return [*rows, overall]


def describe_metric(metric: dict) -> str:
    return f"{metric['value']:.4f}" if metric["available"] else f"skipped: {metric['reason']}"


def publish_evaluation(report: StageReport) -> None:
    """The category scores as a table; the artifact, the metrics and where the report and grids are, above it."""
    s = report.summary
    lines = [
        f"Held-out evaluation of `{s['model']}`: {s['num_images']} images, {s['images_per_prompt']} per prompt. "
        f"Artifact `{report.artifact}` ({report.status}, {report.seconds:.1f} s).",
        "",
        *(f"- {name}: {describe_metric(m)}" for name, m in s["metrics"].items()),
        f"- report: `{s['files']['markdown']}` (data: `{s['files']['json']}`)",
        *(f"- grid {k.removeprefix('grid_')}: `{v}`" for k, v in s["files"].items() if k.startswith("grid_")),
    ]
    create_table_artifact(evaluation_rows(s), key=artifact_key(report.step), description="\n".join(lines))


def run_summary_markdown(reports: list[StageReport], seconds: float, workdir: str) -> str:
    lines = [
        "# PixArt-alpha pipeline run",
        "",
        "ingest -> caption -> features -> stage 1 -> stage 2 -> stage 3 -> export -> samples, evaluation",
        "",
        f"workdir `{workdir}`, {seconds:.1f} s in all",
        "",
        "| step | status | seconds | artifact |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.step} | {r.status} | {r.seconds:.1f} | `{r.artifact}` |" for r in reports]
    outputs = {r.step: r.summary for r in reports}
    if "export" in outputs:
        lines += ["", f"Export: `{outputs['export'].get('dir')}` ({outputs['export'].get('kind')})"]
    if "samples" in outputs:
        lines += [f"Sample grid: `{outputs['samples'].get('grid')}`"]
    if "evaluation" in outputs:
        lines += ["", evaluation_line(outputs["evaluation"], markdown=True)]
    return "\n".join(lines)


def evaluation_line(summary: dict, markdown: bool = False) -> str:
    """'Evaluation: overall 0.420 (color 0.500, ...); report PATH', and each metric's value or why it was skipped."""
    code = "`" if markdown else ""
    scores = ", ".join(f"{c['category']} {c['accuracy']:.3f}" for c in summary["categories"])
    metrics = "".join(f"; {name} {describe_metric(m)}" for name, m in summary["metrics"].items())
    return (
        f"Evaluation: overall {summary['overall']:.3f} ({scores}){metrics}; "
        f"report {code}{summary['files']['markdown']}{code}"
    )


def publish_run_summary(reports: list[StageReport], seconds: float, workdir: str) -> str:
    markdown = run_summary_markdown(reports, seconds, workdir)
    create_markdown_artifact(markdown, key="run-summary", description="What each step of the run did")
    return markdown
