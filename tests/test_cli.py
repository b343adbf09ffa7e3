"""The `pixart` command line: convert, export, errors a user can act on."""

import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from typer.testing import CliRunner

from flows.cli import app
from models.dit import DiT_models
from models.pixart import PixArt, build_pixart
from models.pixart_checkpoint import load_pixart

runner = CliRunner()
TINY = dict(depth=2, hidden_size=48, num_heads=3, patch_size=2, caption_channels=32)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def official_checkpoint(path, lewei_scale=0.5):
    """An official-style checkpoint: {"state_dict": ...} only, no config (as the released .pth files)."""
    torch.manual_seed(0)
    model = PixArt(input_size=8, lewei_scale=lewei_scale, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": model.state_dict()}, path)
    return model.eval()


def test_help_explains_every_command():
    code, out = invoke("--help")
    assert code == 0 and "convert" in out and "export" in out and "demo" in out
    code, out = invoke("convert", "--help")
    assert code == 0 and "official-to-diffusers" in out and "dit-to-pixart" in out
    code, out = invoke("run", "evaluate", "--help")
    assert code == 0 and "evaluate" in out and "--model" in out and "stage3-" in " ".join(out.split())


def test_official_to_diffusers_and_back(tmp_path):
    model = official_checkpoint(tmp_path / "official.pth")
    code, out = invoke("convert", "official-to-diffusers", tmp_path / "official.pth", tmp_path / "hf", "--num-heads", 3)
    assert code == 0, out
    transformer = PixArtTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    assert transformer.config.interpolation_scale == 0.5  # recovered from the stored positional table

    x, y, t = torch.randn(2, 4, 8, 8), torch.randn(2, 120, 32), torch.tensor([3, 700])
    with torch.no_grad():
        ref = transformer(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs={}).sample
        torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=1e-5)

    code, out = invoke("convert", "diffusers-to-official", tmp_path / "hf", tmp_path / "back.pth")
    assert code == 0 and "freshly initialised" in out
    state = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    official = PixArt(input_size=8, lewei_scale=0.5, **TINY)
    official.load_state_dict(state)  # the official code's way of loading
    with torch.no_grad():
        torch.testing.assert_close(official.eval()(x, t, y), ref, atol=1e-5, rtol=1e-5)


def test_dit_to_pixart_then_export(tiny, tmp_path):
    torch.manual_seed(0)
    dit = DiT_models["DiT-T/2"](input_size=8, num_classes=10)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    code, out = invoke("convert", "dit-to-pixart", tmp_path / "dit.pt", tmp_path / "pixart.pth",
                       "--model", "PixArt-T/2", "--t", 400)  # fmt: skip
    assert code == 0, out
    assert "re-parameterised at t=400" in out and "newly initialised" in out
    model = load_pixart(tmp_path / "pixart.pth")
    assert model.caption_channels == 32 and len(model.blocks) == 2

    code, out = invoke("export", tmp_path / "pixart.pth", "--to", tmp_path / "pipe",
                       "--text-encoder", tiny.t5_dir, "--vae", tiny.vae_dir)  # fmt: skip
    assert code == 0, out
    assert isinstance(PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe"), PixArtAlphaPipeline)


def test_bad_checkpoints_get_one_clear_line(tmp_path):
    code, out = invoke("convert", "official-to-diffusers", tmp_path / "nope.pth", tmp_path / "hf")
    assert code == 1 and "does not exist" in out

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    code, out = invoke("convert", "official-to-diffusers", tmp_path / "garbage.pth", tmp_path / "hf")
    assert code == 1 and "cannot read checkpoint" in out

    state = build_pixart("PixArt-T/2", input_size=8).state_dict()
    state["blocks.1.attn.qkv.weight"] = torch.zeros(144, 47)
    del state["blocks.0.mlp.fc2.bias"]
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    code, out = invoke("convert", "official-to-diffusers", tmp_path / "broken.pth", tmp_path / "hf", "--num-heads", 3)
    assert code == 1
    assert "blocks.0.mlp.fc2.bias" in out and "blocks.1.attn.qkv.weight" in out and "(144, 47)" in out

    torch.save(DiT_models["DiT-T/2"](input_size=8).state_dict(), tmp_path / "dit.pt")
    code, out = invoke("convert", "dit-to-pixart", tmp_path / "dit.pt", tmp_path / "x.pth", "--model", "PixArt-XL/2")
    assert code == 1 and "hidden_size=1152 in the preset vs 48 in the DiT" in out
