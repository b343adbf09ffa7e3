"""FID and CLIP score: computed through torchmetrics with local stand-in weights, skipped with a reason without."""

import json

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from models.metrics import MetricResult, MetricsConfig, MetricUnavailable, clip_score, compute_metrics, fid, to_uint8
from storage.sources.shapes import parse_caption, render

PROMPTS = [
    "a large red circle on a gray background",
    "a small blue striped square on a white background",
    "a large green star above a small white cross on a black background",
]


def images(seed: int = 0, n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel + CLIPProcessor (byte-level BPE without merges, 32 px images), saved with save_pretrained."""
    out = tmp_path_factory.mktemp("clip")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: len(vocab) + i for i, c in enumerate(alphabet)}
    vocab |= {c + "</w>": len(vocab) + i for i, c in enumerate(alphabet)}
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(out)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(out)
    return out


def test_clip_score_loads_a_local_clip_and_equals_the_cosine_it_defines(tiny_clip):
    renders = [torch.from_numpy(np.array(render(parse_caption(p), 32, 32))) for p in PROMPTS]  # (H, W, 3) each
    x = torch.stack(renders).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    result = clip_score(x, PROMPTS, MetricsConfig(clip_model=str(tiny_clip)))
    assert isinstance(result, MetricResult) and result.details["num_images"] == 3

    # 100 * max(cos(image, caption), 0), averaged: computed here from the same model, without torchmetrics
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=list(to_uint8(x)), return_tensors="pt")["pixel_values"]
        tokens = processor(text=PROMPTS, return_tensors="pt", padding=True)
        image_emb = embedding(model.get_image_features(pixel_values=pixels))
        text_emb = embedding(model.get_text_features(**tokens))
    cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb)
    assert result.value == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), abs=1e-3)
    assert 0.0 <= result.value <= 100.0


def embedding(out) -> torch.Tensor:
    """The projected embedding: transformers 4 returns it, transformers 5 wraps it in an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Pool(nn.Module):
    """A stand-in FID feature extractor: uint8 (N, 3, H, W) -> per-channel means and stds, (N, 6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_fid_through_torchmetrics_with_a_custom_feature_extractor():
    real, fake = images(0, 64), images(1, 64)
    same = fid(real, real, feature=Pool())
    near = fid(real, fake, feature=Pool())
    far = fid(real, (fake * 0.3 + 0.5).clamp(-1, 1), feature=Pool())  # brighter, lower contrast
    assert isinstance(same, MetricResult) and same.value == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < near.value < far.value
    assert near.details == {"feature_extractor": "Pool", "num_real": 64, "num_fake": 64}


def test_missing_weights_are_a_clear_skip_never_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    real, fake = images(0), images(1)

    missing_file = fid(real, fake, MetricsConfig(fid_weights=str(tmp_path / "inception.pth")))
    assert isinstance(missing_file, MetricUnavailable) and "inception.pth' is not a file" in missing_file.reason

    no_cache = fid(real, fake, MetricsConfig())
    assert isinstance(no_cache, MetricUnavailable)
    assert "pt_inception-2015-12-05-6726825d.pth" in no_cache.reason and "allow_download" in no_cache.reason

    # A weights file that is no Inception checkpoint: skipped with the loader's complaint (or torch-fidelity's absence)
    junk = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    junk.write_bytes(b"not a checkpoint")
    assert isinstance(fid(real, fake, MetricsConfig(fid_weights=str(junk))), MetricUnavailable)

    no_dir = clip_score(fake, ["a"] * 6, MetricsConfig(clip_model=str(tmp_path / "clip")))
    assert isinstance(no_dir, MetricUnavailable) and "does not exist" in no_dir.reason
    not_cached = clip_score(fake, ["a"] * 6, MetricsConfig(clip_model="pixart-tests/no-such-clip"))
    assert isinstance(not_cached, MetricUnavailable) and "not in the local Hugging Face cache" in not_cached.reason

    results = compute_metrics(real, fake, ["a"] * 6, MetricsConfig(clip_model="pixart-tests/no-such-clip"))
    assert set(results) == {"fid", "clip_score"} and not any(r.available for r in results.values())
    json.dumps({k: r.to_dict() for k, r in results.items()})
    assert fid(real[:1], fake).reason.startswith("FID needs at least 2 images")
