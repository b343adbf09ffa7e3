"""The official DiT, its exact conversion to and from diffusers, and loading it from every checkpoint form."""

import argparse
import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import save_file

from models.checkpoint import read_state_dict
from models.convert_dit import diffusers_to_dit, dit_to_diffusers, match_official_numerics
from models.dit import DiT, DiT_models, dit_from_checkpoint

NUM_CLASSES = 10
INPUT_SIZE = 8  # 4 x 4 tokens with patch 2


def tiny_dit(seed: int = 0) -> DiT:
    """DiT-T/2 with every trainable weight random: the zero-initialised adaLN and output layers would
    hide a wrong mapping of exactly the parts the conversion has to get right."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-T/2"](input_size=INPUT_SIZE, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def dit() -> DiT:
    return tiny_dit()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, INPUT_SIZE, INPUT_SIZE, generator=g)
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0])
    y = torch.tensor([0, 3, 9, NUM_CLASSES, NUM_CLASSES])  # NUM_CLASSES is the null class
    return x, t, y


@torch.no_grad()
def run_diffusers(transformer: DiTTransformer2DModel, x, t, y) -> torch.Tensor:
    return transformer(x, timestep=t, class_labels=y).sample


@torch.no_grad()
def test_diffusers_matches_official_dit_once_numerics_are_official(dit, inputs):
    expected = dit(*inputs)
    transformer = dit_to_diffusers(dit)

    # The stock diffusers model differs (timestep shift 1, LayerNorm eps 1e-5): a pitfall, not noise.
    stock = run_diffusers(transformer, *inputs)
    assert (stock - expected).abs().max() > 1e-3

    match_official_numerics(transformer)
    assert transformer.config.norm_eps == 1e-6
    torch.testing.assert_close(run_diffusers(transformer, *inputs), expected, atol=1e-5, rtol=0)

    # The documented shortcut does the same.
    patched = dit_to_diffusers(dit.state_dict(), official_numerics=True)
    torch.testing.assert_close(run_diffusers(patched, *inputs), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_each_numerics_difference_alone_changes_results(dit, inputs):
    """Neither half of `match_official_numerics` is redundant."""
    x, t, y = inputs
    transformer = dit_to_diffusers(dit)
    for block in transformer.transformer_blocks:
        block.norm3.eps = 1e-6
    # Timestep frequencies: whole-model outputs move.
    assert (run_diffusers(transformer, *inputs) - dit(*inputs)).abs().max() > 1e-3

    # LayerNorm eps: visible on activations whose variance is near eps. With the attention branch gated
    # off (zero gate_msa rows), the MLP's LayerNorm sees the raw tokens, of variance ~1e-5.
    quiet = copy.deepcopy(dit)
    gate_msa = slice(2 * 48, 3 * 48)  # adaLN chunks: shift, scale, gate (msa), shift, scale, gate (mlp)
    quiet.blocks[0].adaLN_modulation[1].weight[gate_msa] = 0
    quiet.blocks[0].adaLN_modulation[1].bias[gate_msa] = 0
    block = dit_to_diffusers(quiet, official_numerics=True).transformer_blocks[0]
    tokens = 3e-3 * torch.randn(5, 16, 48, generator=torch.Generator().manual_seed(3))
    official = quiet.blocks[0](tokens, quiet.t_embedder(t) + quiet.y_embedder(y, train=False))
    scale = official.abs().max().item()  # ~90: float32 rounding of fused vs unfused ops is ~1e-7 of it
    torch.testing.assert_close(block(tokens, timestep=t, class_labels=y), official, atol=1e-6 * scale, rtol=0)
    block.norm3.eps = 1e-5
    assert (block(tokens, timestep=t, class_labels=y) - official).abs().max() > 1e-2 * official.abs().max()


@torch.no_grad()
def test_round_trip_gives_identical_state_dict(dit):
    back = diffusers_to_dit(dit_to_diffusers(dit))
    original, returned = dit.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key


def test_diffusers_to_dit_refuses_diverging_embedder_copies(dit):
    transformer = dit_to_diffusers(dit)
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[0] += 1
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.class_embedder"):
        diffusers_to_dit(transformer)


@torch.no_grad()
def test_every_checkpoint_form_loads_the_same_model(dit, inputs, tmp_path):
    sd = dit.state_dict()
    namespace = argparse.Namespace(model="DiT-T/2", image_size=INPUT_SIZE * 8)
    torch.save(sd, tmp_path / "raw.pt")
    # The layout of DiT's train.py: EMA and raw weights, optimizer state and the argparse Namespace.
    wrong = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"model": wrong, "ema": sd, "opt": {"state": {}}, "args": namespace}, tmp_path / "train.pt")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "weights.safetensors")
    transformer = dit_to_diffusers(dit)
    transformer.save_pretrained(tmp_path / "flat")
    transformer.save_pretrained(tmp_path / "pipeline" / "transformer")

    expected = dit(*inputs)
    for name in ["raw.pt", "train.pt", "wrapped.pth", "weights.safetensors", "flat", "pipeline"]:
        loaded = dit_from_checkpoint(tmp_path / name)
        assert loaded.num_heads == 3 and loaded.input_size == INPUT_SIZE
        torch.testing.assert_close(loaded(*inputs), expected, atol=0, rtol=0, msg=name)


def test_bad_checkpoints_raise_errors_naming_keys_and_shapes(dit, tmp_path):
    sd = dit.state_dict()
    bad_shape = dict(sd, **{"blocks.1.attn.qkv.weight": torch.zeros(144, 47)})
    torch.save(bad_shape, tmp_path / "bad_shape.pt")
    expected = r"blocks\.1\.attn\.qkv\.weight: checkpoint \(144, 47\) vs model \(144, 48\)"
    with pytest.raises(ValueError, match=expected):
        dit_from_checkpoint(tmp_path / "bad_shape.pt")

    missing = {k: v for k, v in sd.items() if k != "blocks.0.mlp.fc2.bias"}
    save_file({k: v.contiguous() for k, v in missing.items()}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"1 missing key\(s\): blocks\.0\.mlp\.fc2\.bias \(48,\)"):
        dit_from_checkpoint(tmp_path / "missing.safetensors")

    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        read_state_dict(tmp_path / "nowhere.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*garbage.pt"):
        read_state_dict(tmp_path / "garbage.pt")


@torch.no_grad()
def test_fresh_dit_predicts_zero_and_cfg_guides_three_channels(inputs):
    x, t, y = inputs
    fresh = DiT_models["DiT-T/2"](input_size=INPUT_SIZE, num_classes=NUM_CLASSES).eval()
    assert torch.equal(fresh(x, t, y), torch.zeros(5, 8, INPUT_SIZE, INPUT_SIZE))

    model = tiny_dit(seed=2)
    xx, tt = torch.cat([x[:2], x[:2]]), torch.cat([t[:2], t[:2]])
    yy = torch.tensor([1, 2, NUM_CLASSES, NUM_CLASSES])
    out = model.forward_with_cfg(xx, tt, yy, cfg_scale=4.0)
    cond, uncond = model(xx, tt, yy).chunk(2)
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:2, :3], guided)
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:])


def test_dit_xl_2_has_the_official_parameter_count():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


@torch.no_grad()
def test_label_dropout_uses_the_null_class(dit):
    labels = torch.tensor([1, 2, 3])
    table = dit.y_embedder.embedding_table.weight
    forced = dit.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(forced, table[[NUM_CLASSES, 2, NUM_CLASSES]], atol=0, rtol=0)
    dit.y_embedder.dropout_prob = 1.0  # always drop while training
    try:
        torch.testing.assert_close(dit.y_embedder(labels, train=True), table[[NUM_CLASSES] * 3])
    finally:
        dit.y_embedder.dropout_prob = 0.1
