"""A tiny random Janus checkpoint, built offline, for tests and smoke runs (behind ``semrecon encoder tiny OUT``).

The architecture is Janus's (SigLIP-style vision tower with 24 blocks at 384 px, aligner, Llama LLM,
VQ-VAE) at toy widths, so layer indices 1/13/24 and the 384-px input (crop / pad behaviour) are the real
ones; patches are 32 px (144 image tokens instead of 576) to keep CPU tests fast. The tokenizer is a
word-level vocabulary over the prompts semrecon uses, with Janus's special tokens, and the processor
uses ``JanusImageProcessorPil`` (mean = std = 0.5). The config carries ``semrecon_random_weights: true``;
encoders built from it label themselves "RANDOM WEIGHTS".
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from semrecon_core.encoders.loading import RANDOM_MARKER

_SPECIAL = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "unk": "<unk>",
    "pad": "<｜pad｜>",
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
}


def _vocabulary() -> dict[str, int]:
    from semrecon_core.encoders import instructions

    texts = [instruction.render() for instruction in instructions.NAMED.values()]
    texts += [word for instruction in instructions.NAMED.values() for word in instruction.words]
    words: list[str] = []
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]+", text):
            for variant in (word, word.lower(), word.capitalize()):
                if variant not in words:
                    words.append(variant)
    tokens = list(_SPECIAL.values()) + [w for w in words if w not in _SPECIAL.values()]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_janus(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny random Janus checkpoint with tokenizer and processor into ``out_dir``.

    The directory loads with ``from_pretrained(out_dir, local_files_only=True)``. It is written into a
    temporary sibling directory first and renamed into place, so a partial checkpoint never appears.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty (unless ``overwrite``).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessorPil,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: directory exists and is not empty (pass --overwrite to replace it)")
    vocab = _vocabulary()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_SPECIAL["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos = _SPECIAL["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=_SPECIAL["eos"],
        unk_token=_SPECIAL["unk"],
        pad_token=_SPECIAL["pad"],
        extra_special_tokens={
            "image_token": _SPECIAL["image"],
            "boi_token": _SPECIAL["boi"],
            "eoi_token": _SPECIAL["eoi"],
        },
    )
    processor = JanusProcessor(
        image_processor=JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
        num_image_tokens=144,
    )
    vocab_size = 16 * ((len(vocab) + 15) // 16)
    config = JanusConfig(
        text_config=LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            vocab_size=vocab_size,
            bos_token_id=vocab[bos],
            eos_token_id=vocab[_SPECIAL["eos"]],
            pad_token_id=vocab[_SPECIAL["pad"]],
        ),
        vision_config=JanusVisionConfig(
            hidden_size=32,
            num_hidden_layers=24,
            num_attention_heads=2,
            mlp_ratio=2.0,
            image_size=384,
            patch_size=32,
            num_image_tokens=144,
            projection_dim=64,
        ),
        vq_config=JanusVQVAEConfig(
            embed_dim=4,
            num_embeddings=16,
            base_channels=32,
            latent_channels=32,
            channel_multiplier=[1, 1],
            num_res_blocks=1,
            projection_dim=64,
            image_token_embed_dim=64,
        ),
        image_token_id=vocab[_SPECIAL["image"]],
    )
    setattr(config, RANDOM_MARKER, True)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
