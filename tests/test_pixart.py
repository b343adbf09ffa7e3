"""PixArt / PixArtMS: official key layout, behaviour, and exact agreement with diffusers."""

import pytest
import torch

from models.convert_pixart import (
    diffusers_to_pixart,
    infer_pixart_kwargs,
    pixart_from_state_dict,
    pixart_to_diffusers,
)
from models.pixart import PixArt, PixArtMS, build_pixart

TINY = dict(depth=2, hidden_size=48, num_heads=3, patch_size=2, caption_channels=32, model_max_length=16)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere, including the zero-initialised projections, so comparisons bite.

    Unit-gain scales keep attention logits far from diffusers' -10000 mask bias (which is not -inf).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def captions(n: int, lengths: list[int], length: int = 16, channels: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, length, channels, generator=g)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, k in enumerate(lengths):
        mask[i, :k] = 1
    return y, mask


def test_official_key_layout():
    keys = set(build_pixart("PixArt-T/2", input_size=8, model_max_length=16).state_dict())
    for k in [
        "pos_embed",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "t_block.1.weight",
        "y_embedder.y_embedding",
        "y_embedder.y_proj.fc1.weight",
        "y_embedder.y_proj.fc2.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.weight",
        "blocks.1.cross_attn.q_linear.weight",
        "blocks.1.cross_attn.kv_linear.weight",
        "blocks.1.cross_attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.weight",
        "blocks.1.scale_shift_table",
        "final_layer.linear.weight",
        "final_layer.scale_shift_table",
    ]:
        assert k in keys, k
    ms_keys = set(build_pixart("PixArt-T/2", multi_scale=True, input_size=8).state_dict())
    assert {"csize_embedder.mlp.0.weight", "ar_embedder.mlp.2.weight"} <= ms_keys


def test_reference_initialisation():
    model = build_pixart("PixArt-T/2", input_size=8)
    assert all(not b.cross_attn.proj.weight.any() for b in model.blocks)
    assert not model.final_layer.linear.weight.any()
    assert not model.t_block[1].bias.any()
    assert 0.01 < model.t_block[1].weight.std().item() < 0.03


def test_xl_preset_parameter_count():
    with torch.device("meta"):
        model = build_pixart("PixArt-XL/2", caption_channels=4096)
    n = sum(p.numel() for name, p in model.named_parameters() if name != "y_embedder.y_embedding")
    assert 605e6 < n < 615e6  # the paper's ~611M (the 120 x 4096 null caption excluded)


def test_forward_shapes_and_official_caption_layout():
    model = PixArt(input_size=8, **TINY).eval()
    x = torch.randn(2, 4, 8, 8)
    y, mask = captions(2, [16, 5])
    out = model(x, torch.tensor([10, 900]), y, mask)
    assert out.shape == (2, 8, 8, 8)
    out_4d = model(x, torch.tensor([10, 900]), y[:, None], mask)
    torch.testing.assert_close(out, out_4d)


def test_padded_tokens_are_ignored():
    """Masked tokens change nothing: same output as the caption truncated to its valid tokens."""
    model = randomise(PixArt(input_size=8, **TINY)).eval()
    x = torch.randn(1, 4, 8, 8)
    y, mask = captions(1, [6])
    t = torch.tensor([300])
    full = model(x, t, y, mask)
    y_garbage = y.clone()
    y_garbage[:, 6:] = 1e3
    torch.testing.assert_close(model(x, t, y_garbage, mask), full)
    torch.testing.assert_close(model(x, t, y[:, :6], None), full, atol=1e-5, rtol=1e-5)


def test_caption_dropout_uses_null_embedding():
    model = randomise(PixArt(input_size=8, **TINY)).eval()
    x = torch.randn(2, 4, 8, 8)
    y, _ = captions(2, [16, 16])
    t = torch.tensor([5, 5])
    dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    null = model.y_embedder.y_embedding.detach()[None].expand(2, -1, -1)
    torch.testing.assert_close(dropped[0], model(x, t, null)[0])
    torch.testing.assert_close(dropped[1], model(x, t, y)[1])


def test_forward_with_cfg_guides_all_epsilon_channels():
    model = randomise(PixArt(input_size=8, **TINY)).eval()
    x = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    y, mask = captions(2, [16, 3])
    t = torch.tensor([400, 400])
    raw = model(x, t, y, mask)
    cond, uncond = raw[:1, :4], raw[1:, :4]
    guided = model.forward_with_cfg(x, t, y, 4.5, mask)
    torch.testing.assert_close(guided[0, :4], (uncond + 4.5 * (cond - uncond))[0])
    torch.testing.assert_close(guided[:, 4:], raw[:, 4:])
    reference = model.forward_with_cfg(x, t, y, 4.5, mask, guidance_channels=3)
    torch.testing.assert_close(reference[0, 3], raw[0, 3])  # the reference leaves channel 3 unguided


def test_gradient_checkpointing_same_gradients():
    model = randomise(PixArt(input_size=8, **TINY)).train()
    model.y_embedder.uncond_prob = 0.0
    x = torch.randn(2, 4, 8, 8)
    y, mask = captions(2, [16, 4])
    t = torch.tensor([1, 999])
    model(x, t, y, mask).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y, mask).square().mean().backward()
    assert len(plain) == len(list(model.parameters())) - 1  # all but the unused null caption
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(plain[n], p.grad, msg=n)


def test_clear_errors():
    model = PixArt(input_size=8, **TINY)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="caption_channels=32"):
        model(x, torch.tensor([1]), torch.randn(1, 16, 64))
    with pytest.raises(ValueError, match="no valid token"):
        model(x, torch.tensor([1]), torch.randn(1, 16, 32), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="PixArtMS"):
        model(torch.randn(1, 4, 8, 12), torch.tensor([1]), torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match="divisible by 3"):
        PixArtMS(input_size=8, **{**TINY, "hidden_size": 64, "num_heads": 4})


# ---------------------------------------------------------------------------------------------------
#                                     Agreement with diffusers
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lewei_scale", [1.0, 0.5])
def test_matches_diffusers_pixart(lewei_scale):
    """512-style model (fixed size), masks of different lengths in one batch: same output to 1e-5."""
    model = randomise(PixArt(input_size=8, lewei_scale=lewei_scale, **TINY)).eval()
    theirs = pixart_to_diffusers(model).eval()
    x = torch.randn(3, 4, 8, 8)
    y, mask = captions(3, [16, 7, 1])
    t = torch.tensor([0, 420, 999])
    with torch.no_grad():
        ours = model(x, t, y, mask)
        ref = theirs(
            x,
            encoder_hidden_states=y,
            timestep=t,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_matches_diffusers_pixart_ms_non_square():
    """1024-MS model with resolution / aspect-ratio micro-conditions on non-square latents."""
    model = randomise(PixArtMS(input_size=8, lewei_scale=2.0, **TINY)).eval()
    theirs = pixart_to_diffusers(model).eval()
    x = torch.randn(2, 4, 8, 12)
    y, mask = captions(2, [3, 16])
    t = torch.tensor([17, 640])
    hw = torch.tensor([[64.0, 96.0], [64.0, 96.0]])
    ar = torch.tensor([[2 / 3], [2 / 3]])
    with torch.no_grad():
        ours = model(x, t, y, mask, data_info={"img_hw": hw, "aspect_ratio": ar})
        ref = theirs(
            x,
            encoder_hidden_states=y,
            timestep=t,
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": hw, "aspect_ratio": ar},
        ).sample
    assert ours.shape == (2, 8, 8, 12)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multi_scale", [False, True])
def test_round_trip_through_diffusers(multi_scale):
    cls = PixArtMS if multi_scale else PixArt
    model = randomise(cls(input_size=8, lewei_scale=0.5, **TINY))
    back, fresh = diffusers_to_pixart(
        pixart_to_diffusers(model), null_caption=model.y_embedder.y_embedding, model_max_length=16
    )
    assert fresh == []
    assert type(back) is cls and back.lewei_scale == 0.5
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    _, fresh = diffusers_to_pixart(pixart_to_diffusers(model), model_max_length=16)
    assert fresh == ["y_embedder.y_embedding"]


def test_official_state_dict_architecture_is_inferred(tmp_path):
    model = randomise(PixArtMS(input_size=8, lewei_scale=0.5, **TINY))
    sd = model.state_dict()
    kwargs = infer_pixart_kwargs(sd, num_heads=3)
    assert kwargs["lewei_scale"] == 0.5 and kwargs["input_size"] == 8 and kwargs["multi_scale"]
    assert kwargs["depth"] == 2 and kwargs["caption_channels"] == 32 and kwargs["model_max_length"] == 16
    torch.save({"state_dict": sd}, tmp_path / "ckpt.pth")
    loaded = torch.load(tmp_path / "ckpt.pth", weights_only=True)["state_dict"]
    rebuilt = pixart_from_state_dict(loaded, num_heads=3)
    for k, v in sd.items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, atol=0, rtol=0)


def test_official_checkpoint_loads_with_load_state_dict():
    """The contract of the issue: PixArt(...).load_state_dict(torch.load(path)['state_dict'])."""
    src = randomise(PixArt(input_size=8, **TINY))
    dst = PixArt(input_size=8, **TINY)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(1, 4, 8, 8)
    y, _ = captions(1, [16])
    torch.testing.assert_close(dst.eval()(x, torch.tensor([3]), y), src.eval()(x, torch.tensor([3]), y))
