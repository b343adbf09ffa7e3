"""DiT -> PixArt re-parameterisation: at t* PixArt reproduces DiT's null-class output exactly."""

import pytest
import torch

from models.dit import DiT_models
from models.reparam import dit_to_pixart


def random_dit(seed: int = 0):
    torch.manual_seed(seed)
    dit = DiT_models["DiT-T/2"](input_size=8, num_classes=10)
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:  # pos_embed stays the fixed sin-cos table
                p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return dit.eval()


@pytest.mark.parametrize("t_block_init", ["mean", "normal"])
@pytest.mark.parametrize("t_star", [500, 120])
def test_pixart_equals_dit_null_class_at_t_star(t_block_init, t_star):
    dit = random_dit()
    pixart, report = dit_to_pixart(dit, t=t_star, caption_channels=32, model_max_length=16, t_block_init=t_block_init)
    pixart.eval()
    x = torch.randn(3, 4, 8, 8)
    t = torch.full((3,), t_star)
    y = torch.randn(3, 16, 32)  # any caption: the cross-attention output projection is zero
    mask = torch.ones(3, 16)
    mask[1, 4:] = 0
    with torch.no_grad():
        ours = pixart(x, t, y, mask)
        ref = dit(x, t, torch.full((3,), 10))  # label 10 = the null class
        other_t = pixart(x, t + 300, y, mask)
        ref_other_t = dit(x, t + 300, torch.full((3,), 10))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other_t, ref_other_t, atol=1e-3)  # equality is a property of t* only
    assert pixart.lewei_scale == 1.0 and pixart.input_size == dit.input_size


def test_report_accounts_for_every_key():
    dit = random_dit()
    pixart, report = dit_to_pixart(dit, caption_channels=32, model_max_length=16)
    keys = set(pixart.state_dict())
    parts = [set(report.copied), set(report.reparameterised), set(report.initialised)]
    assert set().union(*parts) == keys
    assert sum(len(p) for p in parts) == len(keys)  # disjoint
    assert "blocks.1.attn.qkv.weight" in report.copied and "t_embedder.mlp.2.weight" in report.copied
    assert "blocks.0.scale_shift_table" in report.reparameterised
    assert "blocks.0.cross_attn.kv_linear.weight" in report.initialised
    assert "y_embedder.y_proj.fc1.weight" in report.initialised
    assert "y_embedder.embedding_table.weight" in report.dropped
    assert "blocks.0.adaLN_modulation.1.weight" in report.dropped
    assert "copied" in report.summary()


def test_mean_t_block_tracks_dit_away_from_t_star():
    """The 'mean' initialisation keeps the modulation closer to DiT's at other timesteps than N(0, 0.02)."""
    dit = random_dit()
    x = torch.randn(2, 4, 8, 8)
    y = torch.randn(2, 16, 32)
    t = torch.tensor([100, 900])
    with torch.no_grad():
        ref = dit(x, t, torch.full((2,), 10))
        errors = {}
        for init in ("mean", "normal"):
            pixart, _ = dit_to_pixart(dit, caption_channels=32, model_max_length=16, t_block_init=init)
            errors[init] = (pixart.eval()(x, t, y) - ref).abs().mean().item()
    assert errors["mean"] < errors["normal"]


def test_preset_mismatch_is_named():
    with pytest.raises(ValueError, match="hidden_size=1152 in the preset vs 48 in the DiT"):
        dit_to_pixart(random_dit(), caption_channels=32, preset="PixArt-XL/2")
