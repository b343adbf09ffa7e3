"""Stage transitions: DiT -> PixArt -> PixArtMS keep the function they inherit."""

import torch

from models.dit import DiT
from models.pixart import PixArt, PixArtMS
from models.pixart_checkpoint import load_pixart, save_pixart
from models.stages import StageModelConfig, build_stage1, build_stage2, build_stage3, to_multi_scale

CFG = StageModelConfig(stage=1, model="PixArt-T/2", input_size=8, caption_channels=32, num_classes=10)


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # DiT's frozen positional table stays the sin-cos grid
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_stage_chain_builds_each_model_from_the_previous():
    dit = build_stage1(CFG)
    assert isinstance(dit, DiT) and dit.y_embedder.num_classes == 10
    pixart, report = build_stage2(CFG.model_copy(update={"stage": 2}), perturbed(dit))
    assert isinstance(pixart, PixArt) and report is not None and report.t == 500
    ms = build_stage3(CFG.model_copy(update={"stage": 3, "input_size": 16}), pixart)
    assert isinstance(ms, PixArtMS) and ms.input_size == 16 and ms.lewei_scale == 2 * pixart.lewei_scale


def test_prediction_type_is_the_stages_and_survives_a_checkpoint(tmp_path):
    v = {"prediction_type": "v_prediction"}
    dit = build_stage1(CFG.model_copy(update=v))
    pixart, _ = build_stage2(CFG.model_copy(update={"stage": 2, **v}), dit)
    ms = build_stage3(CFG.model_copy(update={"stage": 3, "input_size": 16, **v}), pixart)
    assert dit.prediction_type == pixart.prediction_type == ms.prediction_type == "v_prediction"
    assert load_pixart(save_pixart(ms, tmp_path / "ms.pth")).prediction_type == "v_prediction"
    # A stage trains what its config says, whatever its initial model predicted (re-targeting is a fine-tune).
    assert build_stage3(CFG.model_copy(update={"stage": 3}), pixart).prediction_type == "epsilon"


@torch.no_grad()
def test_multi_scale_starts_as_the_stage_two_model():
    pixart = perturbed(PixArt(input_size=8, depth=2, hidden_size=48, num_heads=3, caption_channels=32))
    ms = to_multi_scale(pixart, 8)
    x, y, t = torch.randn(2, 4, 8, 8), torch.randn(2, 120, 32), torch.tensor([3, 800])
    info = {"img_hw": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    torch.testing.assert_close(ms.eval()(x, t, y, data_info=info), pixart(x, t, y), atol=0, rtol=0)


def test_larger_grid_keeps_the_positional_span():
    pixart = PixArt(input_size=8, depth=2, hidden_size=48, num_heads=3, caption_channels=32)
    ms = to_multi_scale(pixart, 16)
    old = pixart.position_table(4, 4).reshape(4, 4, -1)
    new = ms.position_table(8, 8).reshape(8, 8, -1)
    torch.testing.assert_close(new[::2, ::2], old)  # every other cell of the new grid is an old cell
