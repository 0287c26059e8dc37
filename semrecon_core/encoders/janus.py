"""Janus encoders on HuggingFace transformers (``JanusForConditionalGeneration``).

* :class:`JanusImageEncoder` — vision-tower hidden states at chosen layers (``hidden_states[k]`` is the
  output of block ``k`` before the final LayerNorm, so layers 1/13/24 are the public code's levels),
  returned as ``(slices, 576, 1024)`` per level for Janus-Pro-1B. Only the vision tower is kept.
* :class:`JanusLanguageEncoder` — image + instruction in the DeepSeek chat format (rendered as in
  :mod:`semrecon_core.encoders.instructions`: Janus-Pro's ``<|User|>`` roles, or the authors' literal
  ``User`` roles for the ``public-code`` instructions); the embedding is the final (RMS-normalised) LLM
  state of the last prompt token. Gaussian perturbations for banks are added to the text-token embeddings
  only, after the image features are merged. ``answer`` decodes the model's short reply and scores the two
  answer words whole (every sub-token of each spelling).

Precision (:mod:`semrecon_core.encoders.common`): the image-only encoder computes in float32 unless asked
for bfloat16 (the authors run image-only extraction and reconstruction in fp32); the image-language encoder
computes in bfloat16 on CUDA (the authors' LLM path), float32 elsewhere or with autocast off. The dtype is
part of the bank identity. Both are frozen (``requires_grad_(False)``, ``eval()``) and optionally
checkpoint their transformer blocks to trade compute for activation memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from semrecon_core.encoders import instructions as _instructions
from semrecon_core.encoders.common import (
    checked_layers,
    checked_precision,
    compute_dtype,
    dtype_name,
    input_size,
    precision_context,
    preprocessing_identity,
    requested_precision,
)
from semrecon_core.encoders.loading import (
    check_encoder_weights,
    encoder_remedy,
    fingerprint,
    is_random_checkpoint,
    load_model,
    resolve_checkpoint,
)
from semrecon_core.encoders.preprocess import to_pixels

if TYPE_CHECKING:
    from transformers import JanusForConditionalGeneration, JanusVisionModel

DEFAULT_MODEL = "deepseek-community/Janus-Pro-1B"
SYSTEM_PROMPT = _instructions.SYSTEM_PROMPT


class _Loaded:
    """A resolved Janus checkpoint: model, directory, fingerprint and the random-weights flag."""

    def __init__(self, name: str, *, allow_download: bool, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import JanusForConditionalGeneration

        self.name = name
        self.directory = resolve_checkpoint(name, allow_download=allow_download)
        self.revision = fingerprint(self.directory)
        self.is_random = is_random_checkpoint(self.directory)
        model = load_model(JanusForConditionalGeneration, self.directory, dtype=dtype)
        # transformers wraps PreTrainedModel.to with functools.wraps, which mypy does not bind as a method
        self.model = model.to(device)  # type: ignore[arg-type]


def load_vision_tower(directory: Path, *, dtype: torch.dtype = torch.float32) -> JanusVisionModel:
    """The ``JanusVisionModel`` of a full Janus checkpoint, reading only its ``model.vision_model.*`` tensors.

    ``JanusVisionModel.from_pretrained`` on a full checkpoint silently keeps random weights (prefix
    mismatch), and loading the whole model costs the LLM's memory; this reads the vision tensors from the
    safetensors shards and loads them strictly (every parameter must be present). Each shard's header is
    checked first and the stored shapes compared with the config's
    (:class:`~semrecon_core.weights.DamagedWeightsError` naming the file, the tensor, expected and found).
    """
    from safetensors import SafetensorError, safe_open
    from transformers import JanusConfig, JanusVisionModel

    from semrecon_core.weights import DamagedWeightsError, check_tensors

    config = JanusConfig.from_pretrained(directory, local_files_only=True)
    stored = check_encoder_weights(directory)
    vision = JanusVisionModel._from_config(config.vision_config, dtype=dtype)
    prefix = "model.vision_model."
    remedy = encoder_remedy(directory)
    what = "Janus checkpoint (vision tower)"
    check_tensors(stored, vision.state_dict(), path=directory, what=what, remedy=remedy, prefix=prefix)
    state: dict[str, torch.Tensor] = {}
    file = directory
    try:
        for file in sorted({shard for name, (shard, _) in stored.items() if name.startswith(prefix)}):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = handle.get_tensor(key).to(dtype)
    except SafetensorError as exc:  # the header was fine: the data could not be read
        raise DamagedWeightsError(file, f"safetensors: {exc}", what="encoder weights file", remedy=remedy) from None
    vision.load_state_dict(state, strict=True)
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
        precision: ``float32`` (default, the authors' image-only recipe) or ``bfloat16`` (bf16 autocast
            on CUDA; float32 elsewhere).
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
        precision: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        self.layers = checked_layers(layers, len(vision_model.encoder.layers), name)
        self.vision = vision_model.requires_grad_(False).eval()
        self.name = name
        self.revision = revision
        self.is_random = is_random
        self.precision = checked_precision(precision, name)
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
        precision: str = "float32",
        gradient_checkpointing: bool = False,
    ) -> JanusImageEncoder:
        """Load only the vision tower of a Janus checkpoint (HF id or directory).

        ``precision`` is the requested one (``float32`` unless told otherwise); ``autocast=False`` forces
        float32 whatever it says (``ReconConfig.autocast = none``).
        """
        device = torch.device(device)
        precision = requested_precision(checked_precision(precision, name), autocast)
        directory = resolve_checkpoint(name, allow_download=allow_download)
        vision = load_vision_tower(directory, dtype=compute_dtype(device, precision))
        return cls(
            vision.to(device),  # type: ignore[arg-type]  # PreTrainedModel.to: see _Loaded
            name=name,
            revision=fingerprint(directory),
            layers=layers,
            is_random=is_random_checkpoint(directory),
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.vision.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in on its device (``float32`` unless bfloat16 was asked for on CUDA)."""
        return compute_dtype(self.device, self.precision)

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
            "dtype": dtype_name(self.dtype),
            "random_weights": self.is_random,
        }

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Model input ``(slices, 3, H, W)`` from a complex ``(slices, y, x)`` image."""
        return to_pixels(image.to(self.device), self.image_size)

    def encode_pixels(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states ``(slices, tokens, dim)`` (returned as float32) at each of ``layers``."""
        wanted = set(self.layers)
        states: dict[int, torch.Tensor] = {}
        with precision_context(pixels.device, self.dtype):
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
        instruction: a name from :data:`semrecon_core.encoders.instructions.NAMED` or literal text; it
            brings its prompt rendering and answer words.
        is_random: the checkpoint has random weights.
        precision: ``bfloat16`` (default: bf16 autocast on CUDA, as the authors' LLM path; float32
            elsewhere) or ``float32``.
        gradient_checkpointing: checkpoint the LLM's decoder layers when gradients are needed.

    Attributes:
        prompt: the rendered prompt with one image tag (before tokenisation and image-token expansion).
        input_ids: the prompt's token ids with the image tokens expanded.
        choices: the instruction's two answer words.
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
        precision: str = "bfloat16",
        gradient_checkpointing: bool = False,
    ) -> None:
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        spec = _instructions.resolve(instruction)
        self.instruction, self.choices, self.prompt_format = spec.text, spec.words, spec.prompt
        self.prompt = spec.render(self._token("image_token", _instructions.IMAGE_TAG))
        self.is_random = is_random
        self.precision = checked_precision(precision, name)
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
        precision: str = "bfloat16",
        gradient_checkpointing: bool = False,
    ) -> JanusLanguageEncoder:
        """Load a full Janus checkpoint (HF id or directory) and its tokenizer.

        ``autocast=False`` forces float32 whatever ``precision`` says (``ReconConfig.autocast = none``).
        """
        from transformers import AutoTokenizer

        device = torch.device(device)
        precision = requested_precision(checked_precision(precision, name), autocast)
        loaded = _Loaded(name, allow_download=allow_download, device=device, dtype=compute_dtype(device, precision))
        tokenizer = AutoTokenizer.from_pretrained(loaded.directory, local_files_only=True)
        return cls(
            loaded.model,
            tokenizer,
            name=name,
            revision=loaded.revision,
            instruction=instruction,
            is_random=loaded.is_random,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in on its device (bfloat16 on CUDA unless float32 was asked for)."""
        return compute_dtype(self.device, self.precision)

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
            "prompt": self.prompt_format,
            "dtype": dtype_name(self.dtype),
            "random_weights": self.is_random,
        }

    def _token(self, attribute: str, default: str) -> str:
        return getattr(self.tokenizer, attribute, None) or default

    def _token_id(self, token: str) -> int:
        index = self.tokenizer.convert_tokens_to_ids(token)
        if index is None or index == self.tokenizer.unk_token_id:
            raise ValueError(f"encoder '{self.name}': the tokenizer has no token {token!r}")
        return int(index)

    def _prompt_ids(self) -> tuple[torch.Tensor, int]:
        """Token ids of the prompt and the index of its first image token.

        As Janus's ``VLChatProcessor``: the prompt with one image tag is tokenised (with the BOS token), then
        the tag becomes ``<begin_of_image>``, ``num_image_tokens`` image tokens and ``<end_of_image>``.
        """
        image_id = int(self.model.config.image_token_id)
        ids = [int(i) for i in self.tokenizer(self.prompt, add_special_tokens=True)["input_ids"]]
        if ids.count(image_id) != 1:
            raise ValueError(
                f"encoder '{self.name}': the tokenizer turned the prompt's image tag into {ids.count(image_id)} "
                f"image tokens (id {image_id}), expected 1"
            )
        tag = ids.index(image_id)
        begin = self._token_id(self._token("boi_token", "<begin_of_image>"))
        end = self._token_id(self._token("eoi_token", "<end_of_image>"))
        expanded = [*ids[:tag], begin, *[image_id] * self.num_image_tokens, end, *ids[tag + 1 :]]
        return torch.tensor(expanded, dtype=torch.long, device=self.device), tag + 1

    def word_spellings(self, word: str) -> list[tuple[int, ...]]:
        """The distinct token sequences of ``word`` as an answer: as given, capitalised, after a space.

        Raises:
            ValueError: the tokenizer spells none of them without unknown tokens.
        """
        unk = self.tokenizer.unk_token_id
        spellings: list[tuple[int, ...]] = []
        for variant in (word, word.capitalize(), " " + word, " " + word.capitalize()):
            ids = tuple(int(i) for i in self.tokenizer(variant, add_special_tokens=False)["input_ids"])
            if ids and unk not in ids and ids not in spellings:
                spellings.append(ids)
        if not spellings:
            raise ValueError(f"encoder '{self.name}': the tokenizer cannot spell the answer word {word!r}")
        return spellings

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Model input ``(slices, 3, H, W)`` from a complex ``(slices, y, x)`` image."""
        return to_pixels(image.to(self.device), self.image_size)

    def merged_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(slices, tokens, hidden)`` with the image features in the image positions."""
        inner = self.model.model
        with precision_context(pixels.device, self.dtype):
            weight_dtype = inner.aligner.fc1.weight.dtype
            features = inner.get_image_features(pixels.to(weight_dtype), return_dict=True).pooler_output
            text = inner.get_input_embeddings()(self.input_ids.to(pixels.device))  # a no-op: ids live there
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
        with precision_context(embeddings.device, self.dtype):
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
    def answer(
        self, image: torch.Tensor, *, choices: Sequence[str] | None = None, max_new_tokens: int = 6
    ) -> list[dict[str, Any]]:
        """The model's short reply per slice and how probable each answer word is as the reply.

        Each word is scored whole: the log-probability that the reply starts with all of its sub-tokens
        (teacher-forced after the prompt), summed over its spellings (:meth:`word_spellings`: as given,
        capitalised, after a space). Returns one dict per slice: ``answer`` (greedy decoding of up to
        ``max_new_tokens`` tokens), ``choice`` (the more probable word), ``logp_<word>`` (the word's
        log-probability over the whole vocabulary) and ``p_<word>`` (normalised over the candidate words).

        Args:
            image: complex ``(slices, y, x)``.
            choices: the candidate words (default: the instruction's two answer words).
            max_new_tokens: length limit of the greedy reply.
        """
        words = tuple(self.choices if choices is None else choices)
        spellings = [self.word_spellings(word) for word in words]
        embeddings = self.merged_embeddings(self.pixels(image))
        lm, head = self.model.model.language_model, self.model.lm_head
        table = lm.get_input_embeddings()
        device = embeddings.device

        def step(tokens: Sequence[int], cache: Any) -> tuple[torch.Tensor, Any]:
            """Log-probabilities ``(len(tokens), vocab)`` after feeding ``tokens`` on top of ``cache``."""
            inputs = table(torch.tensor([list(tokens)], device=device)).to(embeddings.dtype)
            with precision_context(device, self.dtype):
                out = lm(inputs_embeds=inputs, cache=cache, use_cache=True)
                logits = head(out.last_hidden_state[0]).float()
            return torch.log_softmax(logits, -1), _cache_of(out)

        results = []
        for embedding in embeddings:
            with precision_context(device, self.dtype):
                out = lm(inputs_embeds=embedding.unsqueeze(0), use_cache=True)
                first = torch.log_softmax(head(out.last_hidden_state[0, -1]).float(), -1)
            cache = _cache_of(out)
            length = embedding.shape[0]
            scores = []
            for word_spellings in spellings:
                totals = []
                for ids in word_spellings:
                    total = first[ids[0]]
                    if len(ids) > 1:
                        following, cache = step(ids[:-1], cache)
                        rows = torch.arange(len(ids) - 1, device=device)
                        total = total + following[rows, torch.tensor(ids[1:], device=device)].sum()
                        cache.crop(length - cache.get_seq_length())  # drop the spelling: the prompt alone
                    totals.append(total)
                scores.append(torch.logsumexp(torch.stack(totals), 0))
            log_probabilities = torch.stack(scores)
            probabilities = torch.softmax(log_probabilities, 0)
            tokens: list[int] = []
            logp = first
            for _ in range(max_new_tokens):
                token = int(logp.argmax())
                if token == self.tokenizer.eos_token_id:
                    break
                tokens.append(token)
                following, cache = step([token], cache)
                logp = following[-1]
            result: dict[str, Any] = {
                "answer": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "choice": words[int(probabilities.argmax())],
            }
            for word, lp, p in zip(words, log_probabilities.tolist(), probabilities.tolist(), strict=True):
                result[f"logp_{word}"] = lp
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
