"""benchmarks/ablation.py: every arm trained, judged and reported at toy size; verdicts follow the numbers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "ablation.py"


def load_script():
    """The script as a module (benchmarks/ is not a package); registered first, as dataclasses need."""
    if "ablation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
        sys.modules["ablation"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["ablation"])
    return sys.modules["ablation"]


@pytest.mark.slow
def test_ablation_writes_table_json_and_plot_and_reuses_its_arms(tiny, tmp_path, capsys):
    ablation = load_script()
    out = tmp_path / "out"
    argv = ["--steps", "2", "--eval-every", "2", "--stage1-fraction", "0.5", "--batch", "4", "--model-depth", "1",
            "--hidden", "24", "--heads", "2", "--count", "16", "--per-category", "1", "--images-per-prompt", "1",
            "--no-textures", "--threads", "1", "--out", str(out), "--tiny-dir", str(tiny.t5_dir.parent)]  # fmt: skip
    ablation.main(argv)

    # 1. JSON: every arm of the three ablations, evaluated on the shared step grid (stage 1's end too)
    saved = json.loads((out / "ablation.json").read_text())
    assert set(saved["ablations"]) == {"stage1", "adaln", "captions"}
    steps = {arm: [p["step"] for p in r["points"]] for arm, r in saved["arms"].items()}
    assert steps == {"reference": [2], "from_stage1": [1, 2], "per_block_adaln": [2], "sparse_captions": [2]}
    assert all(set(p["categories"]) == {"color", "shape", "spatial", "complex"}
               for r in saved["arms"].values() for p in r["points"])  # fmt: skip
    arms = saved["arms"]
    assert all(p["heldout_mse"] > 0 and p["heldout_mse_se"] > 0 for r in arms.values() for p in r["points"])
    assert arms["from_stage1"]["stage1_steps"] == 1 and arms["from_stage1"]["stage1_parameters"] > 0
    assert arms["per_block_adaln"]["parameters"] > arms["reference"]["parameters"]
    assert saved["ablations"]["adaln"]["xl_parameters"] == {"single": 611_347_616, "block": 828_985_760}

    # 2. Markdown: the verdicts, and one row per arm and evaluation in each ablation's table
    table = (out / "ablation.md").read_text()
    for name, expected in {
        "stage1": {"from stage 1": 2, "from scratch": 1},
        "adaln": {"adaLN-single": 1, "per-block adaLN": 1},
        "captions": {"dense captions": 1, "sparse captions": 1},
    }.items():
        assert saved["ablations"][name]["verdict"] in table and saved["ablations"][name]["loss_verdict"] in table
        for label, rows in expected.items():
            assert sum(line.startswith(f"| {label} | ") for line in table.splitlines()) == rows, label

    # 3. The plot is a PNG
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 4. A re-run trains nothing and writes the same report
    capsys.readouterr()
    ablation.main(argv)
    assert capsys.readouterr().out.count("reused ablation_arm-") == 4
    assert json.loads((out / "ablation.json").read_text()) == saved


def point(ablation, step: int, overall: float, mse: float = 0.1):
    """An evaluation point with 20 images in each of 5 categories at accuracy `overall`, held-out MSE `mse`."""
    correct = round(overall * 20)
    category = {"accuracy": overall, "ci_low": 0.0, "ci_high": 1.0, "correct": correct, "num_images": 20}
    se = ((correct + 1) / 22 * (1 - (correct + 1) / 22) / 20 * 5) ** 0.5 / 5
    return ablation.EvalPoint(step, 0.1, overall, se, {c: category for c in "abcde"}, mse, 0.002)


def arm(ablation, name: str, scores: list[float], parameters: int = 100, mses: list[float] | None = None):
    mses = mses or [0.1] * len(scores)
    points = [point(ablation, 100 * (i + 1), s, m) for i, (s, m) in enumerate(zip(scores, mses, strict=True))]
    return ablation.ArmResult(name, name, parameters, None, 0, 1.0, 1.0, points)


def test_verdicts_follow_the_numbers():
    ablation = load_script()
    stage1 = ablation.ABLATIONS["stage1"]
    faster = {"from_stage1": arm(ablation, "from_stage1", [0.3, 0.9, 0.95]), "reference": arm(ablation, "reference",
              [0.1, 0.2, 0.3])}  # fmt: skip
    text = ablation.verdict(stage1, faster, budget=300)
    assert text.startswith("claim reproduced")
    assert "first reaches the final score of from scratch (0.300) at step 100 (33% of the budget)" in text

    slower = {"from_stage1": arm(ablation, "from_stage1", [0.0, 0.1, 0.1]), "reference": faster["from_stage1"]}
    assert ablation.verdict(stage1, slower, budget=300).startswith("claim contradicted here")
    close = {"from_stage1": arm(ablation, "from_stage1", [0.3]), "reference": arm(ablation, "reference", [0.35])}
    assert ablation.verdict(stage1, close, budget=100).startswith("claim not resolved at this budget")
    zero = {"from_stage1": arm(ablation, "from_stage1", [0.0]), "reference": arm(ablation, "reference", [0.0])}
    assert ablation.verdict(stage1, zero, budget=100).startswith("not testable at this budget")

    adaln = ablation.ABLATIONS["adaln"]
    same = {"reference": arm(ablation, "reference", [0.5], 74), "per_block_adaln": arm(ablation, "b", [0.5], 100)}
    text = ablation.verdict(adaln, same, budget=100)
    assert text.startswith("consistent with the claim") and "74 vs 100 parameters (26.0% fewer)" in text


def test_loss_verdicts_follow_the_held_out_loss():
    ablation = load_script()
    stage1 = ablation.ABLATIONS["stage1"]
    arms = {
        "from_stage1": arm(ablation, "from_stage1", [0.0, 0.0, 0.0], mses=[0.08, 0.05, 0.04]),
        "reference": arm(ablation, "reference", [0.0, 0.0, 0.0], mses=[0.09, 0.07, 0.05]),
    }
    text = ablation.loss_verdict(stage1, arms, budget=300)
    assert text.startswith("claim reproduced") and "reaches from scratch's final loss at step 200 (67%" in text
    arms["reference"] = arm(ablation, "reference", [0.0], mses=[0.041])
    arms["from_stage1"] = arm(ablation, "from_stage1", [0.0], mses=[0.04])
    assert ablation.loss_verdict(stage1, arms, budget=100).startswith("claim not resolved")
    adaln = ablation.ABLATIONS["adaln"]
    worse = {"reference": arm(ablation, "reference", [0.0], mses=[0.12]), "per_block_adaln": arm(ablation, "b", [0.0])}
    assert ablation.loss_verdict(adaln, worse, budget=100).startswith("claim contradicted here: per-block adaLN")


def test_loss_verdict_pairs_the_arms_on_the_same_draws():
    # Per-sample losses vary a lot with t; the same samples, timesteps and noise in both arms make the
    # difference far more certain than the two means' unpaired errors suggest.
    ablation = load_script()
    base = [0.01 * (1 + i % 50) for i in range(200)]  # spread by timestep
    arms = {
        "from_stage1": arm(ablation, "from_stage1", [0.0], mses=[sum(base) / 200 - 0.001]),
        "reference": arm(ablation, "reference", [0.0], mses=[sum(base) / 200]),
    }
    arms["from_stage1"].points[-1].heldout_mse_se = arms["reference"].points[-1].heldout_mse_se = 0.01
    unpaired = ablation.loss_verdict(ablation.ABLATIONS["stage1"], arms, budget=100)
    assert unpaired.startswith("claim not resolved")
    arms["reference"].points[-1].heldout_values = base
    arms["from_stage1"].points[-1].heldout_values = [v - 0.001 + 0.0001 * (i % 3 - 1) for i, v in enumerate(base)]
    paired = ablation.loss_verdict(ablation.ABLATIONS["stage1"], arms, budget=100)
    assert paired.startswith("claim reproduced"), paired
