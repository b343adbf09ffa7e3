"""PixArt with DiT's per-block adaLN (adaln="block"), the ablation of the paper's adaLN-single."""

import pytest
import torch

from models.convert_pixart import pixart_to_diffusers
from models.dit import DiT
from models.export import export_pipeline
from models.pixart import PixArt, PixArtMS, build_pixart
from models.pixart_checkpoint import load_pixart, model_config, save_pixart
from models.training.config import OptimizerConfig, TrainConfig
from models.training.trainer import Trainer

TINY = dict(depth=2, hidden_size=48, num_heads=3, patch_size=2, caption_channels=32, model_max_length=16)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, the zero-initialised projections included, so that comparisons bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    return model


def inputs(n: int = 2, size: tuple[int, int] = (8, 8), seed: int = 1):
    """x (N, 4, H, W), t (N,), y (N, 16, 32), mask (N, 16) with captions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, *size, generator=g)
    y = torch.randn(n, 16, 32, generator=g)
    mask = (torch.arange(16)[None] < torch.tensor([16, 5] * n)[:n, None]).long()
    return x, torch.tensor([10, 900] * n)[:n], y, mask


def expected_parameters(depth: int, d: int, adaln: str, c_in=4, p=2, c_out=8, c_text=4096, tokens=120) -> int:
    """PixArt's parameters term by term (weights + biases) at MLP ratio 4."""
    shared = (
        (c_in * p * p * d + d)  # x_embedder: patch convolution
        + (256 * d + d + d * d + d)  # t_embedder: 256 frequencies -> D -> D
        + (c_text * d + d + d * d + d)  # y_embedder.y_proj: C_text -> D -> D
        + tokens * c_text  # y_embedder.y_embedding: the null caption
        + depth * (16 * d * d + 13 * d)  # qkv, attn.proj, q_linear, kv_linear, cross proj, fc1 (4D), fc2
        + (d * p * p * c_out + p * p * c_out)  # final_layer.linear
    )
    if adaln == "single":
        return shared + (6 * d * d + 6 * d) + depth * 6 * d + 2 * d  # t_block; (6, D) per block; (2, D) final
    return shared + depth * (6 * d * d + 6 * d) + (2 * d * d + 2 * d)  # an MLP per block; the final layer's MLP


def test_xl_parameter_counts_adaln_single_saves_a_quarter():
    counts = {}
    for adaln in ("single", "block"):
        with torch.device("meta"):
            model = build_pixart("PixArt-XL/2", adaln=adaln)
        counts[adaln] = sum(p.numel() for p in model.parameters())
        assert counts[adaln] == expected_parameters(28, 1152, adaln)
    assert counts == {"single": 611_347_616, "block": 828_985_760}
    # Per-block minus single: (6 depth - 4) D^2 - 6 D = 164 D^2 - 6 D at XL (the tables are small change).
    assert counts["block"] - counts["single"] == 164 * 1152**2 - 6 * 1152 == 217_638_144
    saving = 1 - counts["single"] / counts["block"]
    assert round(saving, 4) == 0.2625  # the paper: adaLN-single saves ~26% of the parameters


def test_block_mode_uses_dit_names_and_no_single_parameters():
    keys = set(PixArt(input_size=8, adaln="block", **TINY).state_dict())
    assert not {k for k in keys if k.startswith("t_block") or k.endswith("scale_shift_table")}
    dit = DiT(input_size=8, hidden_size=48, depth=2, num_heads=3, num_classes=4).state_dict()
    adaln_keys = {k for k in dit if "adaLN_modulation" in k}
    assert len(adaln_keys) == 6  # two per block, two in the final layer
    px = PixArt(input_size=8, adaln="block", **TINY).state_dict()
    assert all(px[k].shape == dit[k].shape for k in adaln_keys)  # a DiT's adaLN weights load as they are


def test_unknown_adaln_is_refused():
    with pytest.raises(ValueError, match="adaln='shared'; expected 'single'"):
        PixArt(input_size=8, adaln="shared", **TINY)


def test_forward_shapes_block_mode():
    model = PixArt(input_size=8, adaln="block", **TINY).eval()
    x, t, y, mask = inputs()
    assert model(x, t, y, mask).shape == (2, 8, 8, 8)
    ms = PixArtMS(input_size=8, adaln="block", **TINY).eval()
    x, t, y, mask = inputs(size=(8, 12))
    info = {"img_hw": torch.tensor([[16.0, 24.0]] * 2), "aspect_ratio": torch.tensor([[16 / 24]] * 2)}
    assert ms(x, t, y, mask, data_info=info).shape == (2, 8, 8, 12)


def test_micro_conditions_reach_the_per_block_modulation():
    """In PixArtMS the size / ratio embeddings join t, which is what every block's adaLN MLP reads."""
    ms = randomise(PixArtMS(input_size=8, adaln="block", **TINY)).eval()
    x, t, y, mask = inputs()
    a = ms(x, t, y, mask, data_info={"img_hw": torch.tensor([[16.0, 16.0]] * 2), "aspect_ratio": torch.ones(2, 1)})
    b = ms(x, t, y, mask, data_info={"img_hw": torch.tensor([[32.0, 16.0]] * 2), "aspect_ratio": torch.ones(2, 1)})
    assert not torch.allclose(a, b)


def test_zero_init_blocks_start_as_the_identity():
    """adaLN-Zero (DiT): every gate is 0 and the cross-attention projection too, so each block returns its input
    whatever the caption or the timestep, and the model predicts exactly 0. adaLN-single's random tables give
    non-zero gates from the start: its blocks already transform the tokens."""
    x, t, y, mask = inputs()
    tokens = torch.randn(2, 16, 48)
    for adaln in ("block", "single"):
        model = PixArt(input_size=8, adaln=adaln, **TINY).eval()
        t_emb = model.t_embedder(t.float())  # (N, D)
        c = t_emb if adaln == "block" else model.t_block(t_emb)  # (N, D) or (N, 6D)
        text = model.y_embedder(y, train=False)  # (N, L, D)
        out = model.blocks[0](tokens, text, c, None)
        if adaln == "block":
            torch.testing.assert_close(out, tokens, atol=0, rtol=0)
            assert not model(x, t, y, mask).any()
        else:
            assert not torch.allclose(out, tokens)


def test_checkpoint_round_trip(tmp_path):
    for cls in (PixArt, PixArtMS):
        model = randomise(cls(input_size=8, adaln="block", **TINY)).eval()
        assert model_config(model)["adaln"] == "block"
        back = load_pixart(save_pixart(model, tmp_path / f"{cls.__name__}.pth")).eval()
        assert type(back) is cls and back.adaln == "block"
        x, t, y, mask = inputs()
        info = {"img_hw": torch.tensor([[16.0, 16.0]] * 2), "aspect_ratio": torch.ones(2, 1)}
        torch.testing.assert_close(back(x, t, y, mask, info), model(x, t, y, mask, info), atol=0, rtol=0)
    assert "adaln" not in model_config(PixArt(input_size=8, **TINY))  # old configs keep their keys


def test_training_changes_the_per_block_modulation():
    """As in DiT, the zero final projection stops every gradient but its own at the first step; from the
    second on, each block's adaLN MLP learns."""
    torch.manual_seed(0)
    model = PixArt(input_size=8, adaln="block", **TINY)
    optimizer = OptimizerConfig(lr=1e-3, warmup_steps=0, lr_scaling="none")
    trainer = Trainer(model, TrainConfig(steps=2, global_batch_size=2, ema_decay=0.9, optimizer=optimizer))
    x, _, y, mask = inputs()
    batch = {"x": x, "y": y, "mask": mask}
    modulations = [*(b.adaLN_modulation[1] for b in model.blocks), model.final_layer.adaLN_modulation[1]]
    trainer.train_step(batch)
    assert model.final_layer.linear.weight.any()
    assert not any(m.weight.any() or m.bias.any() for m in modulations)
    trainer.train_step(batch)
    assert all(m.weight.any() and m.bias.any() for m in modulations)


def test_diffusers_conversion_and_export_refuse_block_mode(tiny, tmp_path):
    model = PixArt(input_size=8, adaln="block", **TINY)
    with pytest.raises(ValueError, match="adaln='block': diffusers' PixArtTransformer2DModel has adaLN-single only"):
        pixart_to_diffusers(model)
    with pytest.raises(ValueError, match="adaln='block'"):
        export_pipeline(model, tmp_path / "pipe", text_encoder=tiny.t5_dir, vae=tiny.vae_dir)
    assert not (tmp_path / "pipe").exists()
