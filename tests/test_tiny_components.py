"""The tiny offline T5, VAE and LLaVA, loaded back through the production loaders."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from models.text_encoder import MAX_LENGTH, T5TextEncoder
from models.tiny import FORMAT_VERSION, MARKER, build_tiny_components
from models.vae import VAE

CAPTIONS = ["a red circle above a blue square", "a photo of a small green dog in a park at sunset, 3 of them."]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing here may reach the hub: any attempt fails instead of downloading."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


# ---------------------------------------------------------------------------------------------------
#                                     T5
# ---------------------------------------------------------------------------------------------------


def test_t5_tokenizer_is_t5_shaped(t5):
    tokenizer = t5.tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    sentinels = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"])
    assert sentinels == [len(tokenizer) - 1, len(tokenizer) - 100]  # at the end, in reverse, as in T5
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(CAPTIONS[0]).input_ids)
    assert tokens[-1] == "</s>" and "<unk>" not in tokens
    assert {"▁circle", "▁square"} <= set(tokens)  # frequent words are whole pieces, rarer ones split
    assert tokenizer.decode(tokenizer(CAPTIONS[1]).input_ids, skip_special_tokens=True) == CAPTIONS[1]


def test_t5_encode_pads_and_truncates_to_120(t5):
    features, mask = t5.encode([*CAPTIONS, "big " * 200])
    assert t5.d_model == 32
    assert features.shape == (3, MAX_LENGTH, 32) and features.dtype == torch.float32
    assert mask.shape == (3, MAX_LENGTH) and mask.dtype == torch.int64
    for row, caption in zip(mask, CAPTIONS, strict=False):
        n = len(t5.tokenizer(caption).input_ids)  # real tokens, EOS included
        assert row.sum() == n and row[:n].all() and not row[n:].any()
    assert mask[2].all()  # truncated to 120, no padding


def test_t5_features_do_not_depend_on_batch_padding(t5):
    alone, mask = t5.encode(CAPTIONS[:1])
    batched, _ = t5.encode(CAPTIONS)
    n = int(mask.sum())
    torch.testing.assert_close(batched[0, :n], alone[0, :n])


@pytest.mark.parametrize(
    ("original", "swapped"),
    [
        # which colour is the object's
        ("a large white star on a black background", "a large black star on a white background"),
        # which shape is above
        (
            "a small red circle above a large blue square on a gray background",
            "a large blue square above a small red circle on a gray background",
        ),
    ],
)
def test_t5_features_depend_on_word_order(t5, original, swapped):
    """Captions with the same words in another order get other features, as from a trained T5: each token's
    features stay far from every token of the swapped caption (a bag-of-words encoder would give ~0.05)."""
    features, mask = t5.encode([original, swapped])  # (2, 120, 32)
    a, b = features[0, : int(mask[0].sum())], features[1, : int(mask[1].sum())]
    assert sorted(t5.tokenizer.tokenize(original)) == sorted(t5.tokenizer.tokenize(swapped))  # the same pieces
    nearest = torch.cdist(a, b).min(dim=1).values  # each token of one caption to its closest in the other
    assert nearest.mean() / a.norm(dim=-1).mean() > 0.3


def test_t5_encode_rejects_a_bare_string(t5):
    with pytest.raises(TypeError, match="list of str"):
        t5.encode(CAPTIONS[0])


# ---------------------------------------------------------------------------------------------------
#                                     VAE
# ---------------------------------------------------------------------------------------------------


def test_vae_encode_sample_decode(vae):
    assert (vae.latent_channels, vae.downsample_factor, vae.scaling_factor) == (4, 8, 0.18215)
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    mean, std = vae.encode(images)
    assert mean.shape == std.shape == (2, 4, 8, 6) and (std > 0).all()

    latents = vae.sample(mean, std, torch.Generator().manual_seed(0))
    again = vae.sample(mean, std, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, again)  # the generator alone fixes the draw
    torch.testing.assert_close(vae.sample(mean, torch.zeros_like(std)), mean * 0.18215)

    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, 64, 48) and decoded.abs().max() <= 1
    # decode undoes the scaling that sample applied
    expected = vae.model.decode(latents / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected)


def test_vae_rejects_sizes_off_the_latent_grid(vae):
    with pytest.raises(ValueError, match="downsample factor 8"):
        vae.encode(torch.zeros(1, 3, 60, 64))


# ---------------------------------------------------------------------------------------------------
#                                     LLaVA
# ---------------------------------------------------------------------------------------------------


def test_llava_generates_captions_for_a_left_padded_batch(tiny):
    processor = AutoProcessor.from_pretrained(tiny.llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny.llava_dir)
    assert processor.tokenizer.padding_side == "left"

    prompts = []
    for question in ["Describe this image and its style in a very detailed manner", "What is it?"]:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompts.append(processor.apply_chat_template(conversation, add_generation_prompt=True))
    assert prompts[1] == "USER: <image>\nWhat is it? ASSISTANT:"

    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (64, 96), "blue")]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    mask = inputs["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]  # the shorter prompt is padded on the left
    first_real = mask[1].argmax()
    assert inputs["input_ids"][1, first_real] == processor.tokenizer.bos_token_id
    assert (inputs["input_ids"] == model.config.image_token_index).sum(1).tolist() == [16, 16]

    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    captions = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


# ---------------------------------------------------------------------------------------------------
#                                     Pipeline directory
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_class", ["T5Tokenizer", "T5TokenizerFast"])
def test_components_load_from_a_diffusers_pipeline_directory(tiny, t5, vae, tmp_path, tokenizer_class):
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        caption_channels=t5.d_model,
        cross_attention_dim=16,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=t5.tokenizer,
        text_encoder=t5.model,
        vae=vae.model,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", tokenizer_class]
    (tmp_path / "model_index.json").write_text(json.dumps(index))

    loaded = PixArtAlphaPipeline.from_pretrained(tmp_path)
    assert loaded.tokenizer(CAPTIONS[0]).input_ids == t5.tokenizer(CAPTIONS[0]).input_ids
    # the wrappers find text_encoder/, tokenizer/ and vae/ through model_index.json
    torch.testing.assert_close(T5TextEncoder.from_pretrained(tmp_path).encode(CAPTIONS), t5.encode(CAPTIONS))
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(VAE.from_pretrained(tmp_path).decode(latents), vae.decode(latents))


# ---------------------------------------------------------------------------------------------------
#                                     Building and loading errors
# ---------------------------------------------------------------------------------------------------


def test_build_is_deterministic_and_reused(tiny, tmp_path):
    weights = ["t5/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "llava/model.safetensors"]
    same = build_tiny_components(tmp_path / "same")
    other = build_tiny_components(tmp_path / "other", seed=1)
    for name in [*weights, "t5/tokenizer.json", "llava/tokenizer.json"]:
        assert (tmp_path / "same" / name).read_bytes() == (tiny.t5_dir.parent / name).read_bytes()
    for name in weights:
        assert (tmp_path / "other" / name).read_bytes() != (tiny.t5_dir.parent / name).read_bytes()

    # a complete build is reused as is
    (same.t5_dir / "sentinel").touch()
    assert build_tiny_components(tmp_path / "same") == same
    assert (same.t5_dir / "sentinel").exists()
    # other arguments do not silently reuse it
    with pytest.raises(ValueError, match="seed"):
        build_tiny_components(tmp_path / "same", seed=1)
    # an interrupted build (no marker) is redone from scratch
    (tmp_path / "same" / MARKER).unlink()
    build_tiny_components(tmp_path / "same")
    assert not (same.t5_dir / "sentinel").exists()
    assert other.t5_dir == tmp_path / "other" / "t5"


def test_pipeline_keeps_one_build_per_recipe(tmp_path):
    """A workdir holds a build per recipe (an older builder's too), and artifact ids name the recipe, so
    features made with another build's T5 are never reused."""
    from tasks.components import resolve_components
    from tasks.config import ComponentsConfig

    first, second = ComponentsConfig(tiny=True), ComponentsConfig(tiny=True, tiny_seed=1)
    old = tmp_path / "components" / "t5"  # where format 1 built, left by an older workdir: ignored
    old.mkdir(parents=True)
    a, b = resolve_components(first, str(tmp_path)), resolve_components(second, str(tmp_path))
    assert Path(a.t5).parent.name == f"format_version={FORMAT_VERSION}-seed=0-t5_d_model=32"
    assert Path(a.t5).parent != Path(b.t5).parent and Path(a.t5).is_dir() and Path(b.t5).is_dir()
    assert first.name("t5") == f"tiny-t5(format_version={FORMAT_VERSION},seed=0,t5_d_model=32)"
    assert first.name("t5") != second.name("t5")


def test_missing_or_wrong_directories_are_named(tiny, tmp_path):
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5"):
        T5TextEncoder.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        VAE.from_pretrained(tmp_path / "no_such_vae")
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expected a T5 encoder"):
        T5TextEncoder.from_pretrained(tiny.llava_dir)
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        VAE.from_pretrained(tiny.t5_dir)
