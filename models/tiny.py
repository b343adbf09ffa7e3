"""Tiny random T5, VAE and LLaVA, built offline and saved like the real ones, for tests and the CPU demo.

Each component is saved with `save_pretrained`, so the production loaders (`T5TextEncoder`, `VAE`, and
transformers' `AutoProcessor` / `LlavaForConditionalGeneration` for captioning) read them exactly as they
read `google/t5-v1_1-xxl`, `stabilityai/sd-vae-ft-ema` and `llava-hf/llava-1.5-7b-hf`. Nothing is
downloaded: the tokenizers are real SentencePiece models trained here on a small built-in corpus of
caption-like sentences, with the special-token layout of the real ones (T5: pad 0, eos 1, unk 2, 100
sentinels at the end; Llama: unk 0, bos 1, eos 2, byte fallback), so tokenisation behaves like the real
thing on short English captions. The weights are random: outputs have the right shapes, not meaning.

    python -m models.tiny OUT_DIR    # builds (or reuses) OUT_DIR and prints the three directories
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from diffusers import AutoencoderKL
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Bumped whenever a build changes, so that an old build in the same directory is not taken for a new one.
FORMAT_VERSION = 2  # 2: the T5's position bias is scaled (T5_POSITION_BIAS_SCALE)
MARKER = "tiny_components.json"  # written last: its presence means the build is complete

# ---------------------------------------------------------------------------------------------------
#                                     Caption-like training corpus
# ---------------------------------------------------------------------------------------------------

COLOURS = "red green blue yellow purple orange black white pink brown grey golden silver cyan violet beige".split()
SHAPES = "circle square triangle star hexagon rectangle ellipse cross heart diamond cube sphere cone cylinder".split()
OBJECTS = (
    "dog cat car tree house mountain river bird flower boat chair table person woman man child horse building "
    "cup bottle book lamp bicycle bridge castle clock apple banana cake window door road sky cloud lake field "
    "garden kitchen street train airplane robot ship guitar"
).split()
ADJECTIVES = (
    "small large bright dark shiny wooden metallic striped soft old tiny beautiful modern ancient colorful "
    "simple detailed glowing fluffy smooth rough empty crowded quiet"
).split()
POSITIONS = [
    "above", "below", "to the left of", "to the right of", "next to", "inside", "behind", "in front of",
    "on top of", "near", "between two", "surrounded by",
]  # fmt: skip
STYLES = [
    "a photo of", "a painting of", "a drawing of", "an illustration of", "a close-up photograph of",
    "a watercolor of", "a 3D render of", "a sketch of", "an oil painting of", "a cartoon of", "a pixel art of",
]  # fmt: skip
SCENES = [
    "in a park", "on a beach", "at night", "in the snow", "under a cloudy sky", "in a city street",
    "in a forest", "on a table", "in the desert", "at sunset", "on a white background", "in the rain",
]  # fmt: skip
OPENINGS = [
    "The image features", "In the background, there is", "The scene is lit by soft light, and",
    "This picture shows", "Describe this image and its style in a very detailed manner.",
    "The overall style is realistic with", "The composition is centered on", "Next to it stands",
]  # fmt: skip
# Every printable ASCII character gets a piece of its own, so no English caption hits <unk>.
ASCII = string.ascii_letters + string.digits + string.punctuation


def caption_corpus(num_sentences: int = 2000) -> list[str]:
    """Short captions in the style of the prompts PixArt sees and the captions LLaVA writes (fixed seed)."""
    rng = random.Random(0)
    things = [SHAPES, OBJECTS]
    lines = []
    for _ in range(num_sentences):
        colour, other_colour = rng.choice(COLOURS), rng.choice(COLOURS)
        first = f"a {rng.choice(ADJECTIVES)} {colour} {rng.choice(rng.choice(things))}"
        second = f"a {other_colour} {rng.choice(rng.choice(things))}"
        if rng.random() < 0.5:
            lines.append(f"{rng.choice(STYLES)} {first} {rng.choice(POSITIONS)} {second} {rng.choice(SCENES)}.")
        else:
            lines.append(
                f"{rng.choice(OPENINGS)} {first} {rng.choice(SCENES)}. {rng.choice(STYLES).capitalize()} "
                f"{second}, {rng.randint(1, 12)} of them."
            )
    lines.append(ASCII)
    return lines


def train_sentencepiece(path: Path, **options) -> None:
    """Train a SentencePiece model on `caption_corpus()` into `path` (single-threaded, so deterministic)."""
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(caption_corpus()),
            model_writer=f,
            character_coverage=1.0,
            required_chars=ASCII,
            num_threads=1,
            minloglevel=2,
            **options,
        )


# ---------------------------------------------------------------------------------------------------
#                                     Components
# ---------------------------------------------------------------------------------------------------

# T5 v1.1 layout (gated-GELU feed-forward, untied embeddings) at toy width. The real XXL encoder:
# d_model 4096, 24 layers, 64 heads of 64, d_ff 10240.
T5_LAYERS, T5_HEADS, T5_D_KV, T5_D_FF = 2, 2, 16, 64
T5_VOCAB = 256  # SentencePiece pieces before the 100 sentinels (the real one: 32000)
T5_EXTRA_IDS = 100
# At T5's init scale a random encoder is nearly a bag of words: its relative-position bias (std d_model^-0.5)
# leaves attention close to uniform, so swapping two words ("a white star on a black background" / "a black
# star on a white background") moves each token's features by only 5-9%, and a model conditioned on them
# cannot tell which colour is the object's or which shape is above. A trained T5 separates such captions.
# Scaled up, the bias gives each head its own random neighbourhood, so the features depend on word order
# (the same swaps move them by 48-63%); the weights stay random.
T5_POSITION_BIAS_SCALE = 10.0

# 4 resolutions like the SD VAE, so the downsample factor is 8 as in production (latent 8x8 for a
# 64 px image): 81k parameters, a 64 px image encodes and decodes in milliseconds on a CPU.
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)
VAE_LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.18215  # the SD VAE's, so latents are scaled exactly as in production

# LLaVA-1.5's layout (CLIP ViT -> 2-layer GELU projector -> Llama) at toy size: 32 px images in 8 px
# patches give 16 image tokens (the CLS token is dropped, vision_feature_select_strategy "default").
LLAVA_IMAGE_SIZE, LLAVA_PATCH_SIZE = 32, 8
LLAVA_HIDDEN, LLAVA_LAYERS, LLAVA_HEADS, LLAVA_MLP = 32, 2, 2, 64
LLAVA_VOCAB = 512  # Llama BPE pieces including unk/bos/eos and the 256 byte-fallback pieces
# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_t5(out: Path, seed: int, d_model: int) -> None:
    """T5 encoder + T5 tokenizer in one directory (spiece.model kept for transformers' slow tokenizer)."""
    # T5's own SentencePiece settings: unigram, NFKC, pad 0 / eos 1 / unk 2, no bos.
    out.mkdir(parents=True)
    train_sentencepiece(
        out / "spiece.model",
        model_type="unigram",
        vocab_size=T5_VOCAB,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        normalization_rule_name="nmt_nfkc",
    )
    tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=T5_EXTRA_IDS)
    tokenizer.save_pretrained(out)

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        num_layers=T5_LAYERS,
        num_heads=T5_HEADS,
        d_kv=T5_D_KV,
        d_ff=T5_D_FF,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(T5_POSITION_BIAS_SCALE)
    model.save_pretrained(out)


def build_vae(out: Path, seed: int) -> None:
    """AutoencoderKL with the SD VAE's structure (downsample factor 8) and toy widths."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            block_out_channels=VAE_BLOCK_OUT_CHANNELS,
            latent_channels=VAE_LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=VAE_SCALING_FACTOR,
        )
    vae.save_pretrained(out)


def build_llava(out: Path, seed: int) -> None:
    """LLaVA-1.5 model + processor (Llama tokenizer with <image> and <pad>, CLIP image processor)."""
    # 1. Tokenizer: Llama's SentencePiece settings (BPE, byte fallback, unk 0 / bos 1 / eos 2, no pad),
    #    then llava-hf's additions: <pad> and <image>, BOS prepended, left padding for batched generate.
    out.mkdir(parents=True)
    train_sentencepiece(
        out / "tokenizer.model",
        model_type="bpe",
        vocab_size=LLAVA_VOCAB,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
    )
    tokenizer = LlamaTokenizer.from_pretrained(out, add_bos_token=True, padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)

    # 2. Processor
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    # 3. Model
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=LLAVA_HIDDEN,
            intermediate_size=LLAVA_MLP,
            num_hidden_layers=LLAVA_LAYERS,
            num_attention_heads=LLAVA_HEADS,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH_SIZE,
            projection_dim=LLAVA_HIDDEN,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=LLAVA_HIDDEN,
            intermediate_size=LLAVA_MLP,
            num_hidden_layers=LLAVA_LAYERS,
            num_attention_heads=LLAVA_HEADS,
            num_key_value_heads=LLAVA_HEADS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlavaForConditionalGeneration(config).save_pretrained(out)


# ---------------------------------------------------------------------------------------------------
#                                     Build all
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyComponents:
    """Directories that the production loaders accept in place of hub ids."""

    t5_dir: Path  # T5EncoderModel + T5 tokenizer: T5TextEncoder.from_pretrained(t5_dir)
    vae_dir: Path  # AutoencoderKL: VAE.from_pretrained(vae_dir)
    llava_dir: Path  # LlavaForConditionalGeneration + LlavaProcessor (AutoProcessor)


def tiny_recipe(seed: int = 0, t5_d_model: int = 32) -> dict:
    """What a build's bytes depend on: the builder's format version and the arguments."""
    return {"format_version": FORMAT_VERSION, "seed": seed, "t5_d_model": t5_d_model}


def build_tiny_components(out_dir: str | os.PathLike, *, seed: int = 0, t5_d_model: int = 32) -> TinyComponents:
    """Build the tiny T5, VAE and LLaVA under `out_dir`, or reuse a complete build with the same arguments.

    Same seed, same bytes. `t5_d_model` is the caption feature width (PixArt's `caption_channels`).
    The marker file is written last, so an interrupted build is redone, never reused.
    """
    # 1. Reuse a complete build
    out_dir = Path(out_dir)
    components = TinyComponents(out_dir / "t5", out_dir / "vae", out_dir / "llava")
    recipe = tiny_recipe(seed, t5_d_model)
    marker = out_dir / MARKER
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built != recipe:
            raise ValueError(
                f"{out_dir} already holds tiny components built with {built}, not {recipe}; "
                "pass another out_dir or delete this one"
            )
        return components

    # 2. Clear what an interrupted build left, then build each component
    for path in (components.t5_dir, components.vae_dir, components.llava_dir):
        shutil.rmtree(path, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_t5(components.t5_dir, seed, t5_d_model)
    build_vae(components.vae_dir, seed)
    build_llava(components.llava_dir, seed)

    # 3. Mark the build complete (atomically)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(recipe, indent=2) + "\n")
    os.replace(tmp, marker)
    return components


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="built here, or reused if a complete build is here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--t5-d-model", type=int, default=32, help="T5 feature width (caption_channels)")
    args = parser.parse_args(argv)
    components = build_tiny_components(args.out_dir, seed=args.seed, t5_d_model=args.t5_d_model)
    for name, path in vars(components).items():
        print(f"{name}={path}")


if __name__ == "__main__":
    main()
