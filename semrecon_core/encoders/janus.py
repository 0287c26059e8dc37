"""Janus encoders on HuggingFace transformers (``JanusForConditionalGeneration``).

* :class:`JanusImageEncoder` — vision-tower hidden states at chosen layers (``hidden_states[k]`` is the
  output of block ``k`` before the final LayerNorm, so layers 1/13/24 are the public code's levels),
  returned as ``(slices, 576, 1024)`` per level for Janus-Pro-1B. Only the vision tower is kept.
* :class:`JanusLanguageEncoder` — image + instruction in the DeepSeek chat format; the embedding is the
  final (RMS-normalised) LLM state of the last prompt token. Gaussian perturbations for banks are added
  to the text-token embeddings only, after the image features are merged. ``answer`` decodes the model's
  short reply and the probabilities of the two answer words.

Both are frozen (``requires_grad_(False)``, ``eval()``), run under bfloat16 autocast on CUDA when asked,
and optionally checkpoint their transformer blocks to trade compute for activation memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from semrecon_core.encoders import instructions as _instructions
from semrecon_core.encoders.common import (
    autocast_context,
    checked_layers,
    input_size,
    load_dtype,
    preprocessing_identity,
)
from semrecon_core.encoders.loading import (
    EncoderUnavailable,
    fingerprint,
    is_random_checkpoint,
    load_model,
    resolve_checkpoint,
)
from semrecon_core.encoders.preprocess import to_pixels

if TYPE_CHECKING:
    from transformers import JanusForConditionalGeneration, JanusVisionModel

DEFAULT_MODEL = "deepseek-community/Janus-Pro-1B"
# The DeepSeek conversation format of the original Janus code ("deepseek" sft format, default system prompt).
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
_PROMPT = "{system}\n\n<|User|>: {image}\n{instruction}\n\n<|Assistant|>:"


class _Loaded:
    """A resolved Janus checkpoint: model, directory, fingerprint and the random-weights flag."""

    def __init__(self, name: str, *, allow_download: bool, device: torch.device, autocast: bool) -> None:
        from transformers import JanusForConditionalGeneration

        self.name = name
        self.directory = resolve_checkpoint(name, allow_download=allow_download)
        self.revision = fingerprint(self.directory)
        self.is_random = is_random_checkpoint(self.directory)
        dtype = load_dtype(device, autocast)
        model = load_model(JanusForConditionalGeneration, self.directory, dtype=dtype)
        # transformers wraps PreTrainedModel.to with functools.wraps, which mypy does not bind as a method
        self.model = model.to(device)  # type: ignore[arg-type]


def load_vision_tower(directory: Path, *, dtype: torch.dtype = torch.float32) -> JanusVisionModel:
    """The ``JanusVisionModel`` of a full Janus checkpoint, reading only its ``model.vision_model.*`` tensors.

    ``JanusVisionModel.from_pretrained`` on a full checkpoint silently keeps random weights (prefix
    mismatch), and loading the whole model costs the LLM's memory; this reads the vision tensors from the
    safetensors shards and loads them strictly (every parameter must be present).
    """
    from safetensors import safe_open
    from transformers import JanusConfig, JanusVisionModel

    config = JanusConfig.from_pretrained(directory, local_files_only=True)
    vision = JanusVisionModel._from_config(config.vision_config, dtype=dtype)
    prefix = "model.vision_model."
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = handle.get_tensor(key).to(dtype)
    try:
        vision.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EncoderUnavailable(
            f"encoder '{directory}': vision-tower weights do not match the config: {exc}"
        ) from None
    return vision.requires_grad_(False).eval()


def _run_block(block: torch.nn.Module, hidden: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        out = checkpoint(block, hidden, None, use_reentrant=False)
    else:
        out = block(hidden, None)
    return out[0] if isinstance(out, tuple) else out


class JanusImageEncoder:
    """Image-only Janus encoder: vision-tower token states at ``layers``.

    Args:
        vision_model: a ``JanusVisionModel`` (frozen).
        name: model id or directory (for labels and bank metadata).
        revision: checkpoint fingerprint.
        layers: hidden-state indices (0 = patch embeddings, k = output of block k).
        is_random: the checkpoint has random weights.
        autocast: bfloat16 autocast on CUDA.
        gradient_checkpointing: recompute block activations in the backward pass.
    """

    kind = "image"

    def __init__(
        self,
        vision_model: JanusVisionModel,
        *,
        name: str,
        revision: str,
        layers: Sequence[int] = (1, 13, 24),
        is_random: bool = False,
        autocast: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.layers = checked_layers(layers, len(vision_model.encoder.layers), name)
        self.vision = vision_model.requires_grad_(False).eval()
        self.name = name
        self.revision = revision
        self.is_random = is_random
        self.autocast = autocast
        self.gradient_checkpointing = gradient_checkpointing
        self.image_size = input_size(vision_model.config.image_size)
        self.label = f"Janus image-only encoder ({name}, layers {'/'.join(map(str, self.layers))})"
        if is_random:
            self.label += " RANDOM WEIGHTS"

    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        layers: Sequence[int] = (1, 13, 24),
        device: str | torch.device = "cpu",
        allow_download: bool = False,
        autocast: bool = True,
        gradient_checkpointing: bool = False,
    ) -> JanusImageEncoder:
        """Load only the vision tower of a Janus checkpoint (HF id or directory)."""
        device = torch.device(device)
        directory = resolve_checkpoint(name, allow_download=allow_download)
        vision = load_vision_tower(directory, dtype=load_dtype(device, autocast))
        return cls(
            vision.to(device),  # type: ignore[arg-type]  # PreTrainedModel.to: see _Loaded
            name=name,
            revision=fingerprint(directory),
            layers=layers,
            is_random=is_random_checkpoint(directory),
            autocast=autocast,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.vision.parameters()).device

    @property
    def identity(self) -> dict[str, Any]:
        """Bank-relevant description of this encoder."""
        return {
            "model": self.name,
            "family": "janus",
            "revision": self.revision,
            "kind": self.kind,
            "layers": list(self.layers),
            "preprocessing": preprocessing_identity(self.image_size),
            "random_weights": self.is_random,
        }

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Model input ``(slices, 3, H, W)`` from a complex ``(slices, y, x)`` image."""
        return to_pixels(image.to(self.device), self.image_size)

    def encode_pixels(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states ``(slices, tokens, dim)`` (float32) at each of ``layers``."""
        wanted = set(self.layers)
        states: dict[int, torch.Tensor] = {}
        with autocast_context(pixels.device, self.autocast):
            hidden = self.vision.embeddings(pixels.to(self.vision.embeddings.patch_embedding.weight.dtype))
            if 0 in wanted:
                states[0] = hidden
            for index, block in enumerate(self.vision.encoder.layers[: max(self.layers)], start=1):
                hidden = _run_block(block, hidden, self.gradient_checkpointing)
                if index in wanted:
                    states[index] = hidden
        return [states[k].float() for k in self.layers]

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Per-level token states of a complex ``(slices, y, x)`` image; differentiable."""
        return self.encode_pixels(self.pixels(image))


class JanusLanguageEncoder:
    """Image-language Janus encoder: final LLM state of the last token for image + instruction.

    Args:
        model: a ``JanusForConditionalGeneration`` (frozen).
        tokenizer: its tokenizer (with the image, begin-of-image and end-of-image tokens).
        name: model id or directory.
        revision: checkpoint fingerprint.
        instruction: a name from :data:`semrecon_core.encoders.instructions.NAMED` or literal text.
        is_random: the checkpoint has random weights.
        autocast: bfloat16 autocast on CUDA.
        gradient_checkpointing: checkpoint the LLM's decoder layers when gradients are needed.
    """

    kind = "language"

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        tokenizer: Any,
        *,
        name: str,
        revision: str,
        instruction: str = "paper",
        is_random: bool = False,
        autocast: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.instruction, self.choices = _instructions.resolve(instruction)
        self.is_random = is_random
        self.autocast = autocast
        if gradient_checkpointing:
            self.model.model.language_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            # HF checkpoints blocks only in training mode; the LLM has no dropout, so nothing else changes.
            self.model.model.language_model.train()
        vision_config = model.config.vision_config
        if vision_config is None or isinstance(vision_config, dict):  # JanusConfig makes it a JanusVisionConfig
            raise TypeError(f"encoder '{name}': the model's config.vision_config is not a config object")
        self.image_size = input_size(vision_config.image_size)
        self.num_image_tokens = int(vision_config.num_image_tokens)
        self.input_ids, self.image_start = self._prompt_ids()
        self.choice_ids = [self._answer_token_ids(word) for word in self.choices]
        self.label = f"Janus image-language encoder ({name})"
        if is_random:
            self.label += " RANDOM WEIGHTS"

    @classmethod
    def from_pretrained(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        instruction: str = "paper",
        device: str | torch.device = "cpu",
        allow_download: bool = False,
        autocast: bool = True,
        gradient_checkpointing: bool = False,
    ) -> JanusLanguageEncoder:
        """Load a full Janus checkpoint (HF id or directory) and its tokenizer."""
        from transformers import AutoTokenizer

        device = torch.device(device)
        loaded = _Loaded(name, allow_download=allow_download, device=device, autocast=autocast)
        tokenizer = AutoTokenizer.from_pretrained(loaded.directory, local_files_only=True)
        return cls(
            loaded.model,
            tokenizer,
            name=name,
            revision=loaded.revision,
            instruction=instruction,
            is_random=loaded.is_random,
            autocast=autocast,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device

    @property
    def identity(self) -> dict[str, Any]:
        """Bank-relevant description of this encoder."""
        return {
            "model": self.name,
            "family": "janus",
            "revision": self.revision,
            "kind": self.kind,
            "layers": ["llm-final-last-token"],
            "preprocessing": preprocessing_identity(self.image_size),
            "instruction": self.instruction,
            "random_weights": self.is_random,
        }

    def _prompt_ids(self) -> tuple[torch.Tensor, int]:
        tok = self.tokenizer
        image_token = getattr(tok, "image_token", None) or "<image_placeholder>"
        begin = getattr(tok, "boi_token", None) or "<begin_of_image>"
        end = getattr(tok, "eoi_token", None) or "<end_of_image>"
        image = begin + image_token * self.num_image_tokens + end
        text = _PROMPT.format(system=SYSTEM_PROMPT, image=image, instruction=self.instruction)
        ids = torch.tensor(tok(text, add_special_tokens=True)["input_ids"], dtype=torch.long)
        positions = (ids == self.model.config.image_token_id).nonzero().flatten()
        if positions.numel() != self.num_image_tokens or int(positions[-1] - positions[0]) + 1 != positions.numel():
            raise ValueError(
                f"encoder '{self.name}': tokenizer produced {positions.numel()} contiguous image tokens "
                f"(id {self.model.config.image_token_id}), expected {self.num_image_tokens}"
            )
        return ids, int(positions[0])

    def _answer_token_ids(self, word: str) -> torch.Tensor:
        ids: set[int] = set()
        unk = self.tokenizer.unk_token_id
        for variant in (word, word.capitalize(), " " + word, " " + word.capitalize()):
            encoded = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] != unk:
                ids.add(int(encoded[0]))
        if not ids:
            raise ValueError(f"encoder '{self.name}': the tokenizer has no token for the answer word '{word}'")
        return torch.tensor(sorted(ids), dtype=torch.long)

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Model input ``(slices, 3, H, W)`` from a complex ``(slices, y, x)`` image."""
        return to_pixels(image.to(self.device), self.image_size)

    def merged_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(slices, tokens, hidden)`` with the image features in the image positions."""
        inner = self.model.model
        with autocast_context(pixels.device, self.autocast):
            weight_dtype = inner.aligner.fc1.weight.dtype
            features = inner.get_image_features(pixels.to(weight_dtype), return_dict=True).pooler_output
            text = inner.get_input_embeddings()(self.input_ids.to(pixels.device))
        text = text.unsqueeze(0).expand(pixels.shape[0], -1, -1).to(features.dtype)
        if features.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"encoder '{self.name}': vision tower gives {features.shape[1]} image tokens, config says "
                f"{self.num_image_tokens} (vision_config.num_image_tokens)"
            )
        start, stop = self.image_start, self.image_start + self.num_image_tokens
        return torch.cat([text[:, :start], features, text[:, stop:]], dim=1)

    def text_mask(self) -> torch.Tensor:
        """Bool ``(tokens,)``: True at every non-image position (where perturbations go)."""
        mask = torch.ones(self.input_ids.numel(), dtype=torch.bool)
        mask[self.image_start : self.image_start + self.num_image_tokens] = False
        return mask

    def _final_state(self, embeddings: torch.Tensor) -> torch.Tensor:
        with autocast_context(embeddings.device, self.autocast):
            out = self.model.model.language_model(inputs_embeds=embeddings, use_cache=False)
        return out.last_hidden_state[:, -1].float()

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """One level: the final LLM state ``(slices, hidden)`` of a complex ``(slices, y, x)`` image."""
        return [self._final_state(self.merged_embeddings(self.pixels(image)))]

    def encode_perturbed(
        self,
        image: torch.Tensor,
        *,
        count: int,
        sigma: float,
        generator: torch.Generator | None = None,
        chunk: int = 8,
    ) -> torch.Tensor:
        """``count`` embeddings per slice ``(slices, count, hidden)`` with N(0, σ²) noise on text tokens."""
        with torch.no_grad():
            merged = self.merged_embeddings(self.pixels(image))
            mask = self.text_mask().to(merged.device)[None, :, None]
            out = []
            for embedding in merged:
                states = []
                for batch in _chunks(count, chunk):
                    noise = torch.randn(
                        (batch, *embedding.shape), generator=generator, device="cpu", dtype=torch.float32
                    ).to(merged.device, merged.dtype)
                    states.append(self._final_state(embedding.unsqueeze(0) + noise * sigma * mask))
                out.append(torch.cat(states))
        return torch.stack(out)

    @torch.no_grad()
    def answer(self, image: torch.Tensor, *, max_new_tokens: int = 6) -> list[dict[str, Any]]:
        """The model's short reply per slice and the probabilities of the two answer words.

        Returns one dict per slice: ``answer`` (greedy decoding), ``choice`` (the more probable answer
        word), and ``p_<word>`` for both words (softmax over the two words' first-token logits, each word
        summing over its capitalisation / leading-space variants).
        """
        embeddings = self.merged_embeddings(self.pixels(image))
        lm, head = self.model.model.language_model, self.model.lm_head
        results = []
        for embedding in embeddings:
            with autocast_context(embedding.device, self.autocast):
                out = lm(inputs_embeds=embedding.unsqueeze(0), use_cache=True)
                logits = head(out.last_hidden_state[:, -1]).float()[0]
            scores = torch.stack([torch.logsumexp(logits[ids.to(logits.device)], 0) for ids in self.choice_ids])
            probabilities = torch.softmax(scores, 0)
            tokens = []
            cache = _cache_of(out)
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if token == self.tokenizer.eos_token_id:
                    break
                tokens.append(token)
                step = lm.get_input_embeddings()(torch.tensor([[token]], device=embedding.device))
                with autocast_context(embedding.device, self.autocast):
                    out = lm(inputs_embeds=step.to(embedding.dtype), cache=cache, use_cache=True)
                    logits = head(out.last_hidden_state[:, -1]).float()[0]
                cache = _cache_of(out)
            result: dict[str, Any] = {
                "answer": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "choice": self.choices[int(probabilities.argmax())],
            }
            for word, p in zip(self.choices, probabilities.tolist(), strict=True):
                result[f"p_{word}"] = p
            results.append(result)
        return results


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _chunks(total: int, size: int) -> Iterator[int]:
    for start in range(0, total, max(size, 1)):
        yield min(size, total - start)


__all__ = ["DEFAULT_MODEL", "SYSTEM_PROMPT", "JanusImageEncoder", "JanusLanguageEncoder"]
