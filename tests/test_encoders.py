"""Semantic encoders on tiny random checkpoints: preprocessing, layer indexing, gradients, frozen weights,
the image-language path and its answer, offline loading and the generic HF vision encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from semrecon_core.encoders import instructions  # noqa: E402
from semrecon_core.encoders.hf_vision import HFVisionEncoder  # noqa: E402
from semrecon_core.encoders.janus import JanusImageEncoder, JanusLanguageEncoder  # noqa: E402
from semrecon_core.encoders.loading import EncoderUnavailable  # noqa: E402
from semrecon_core.encoders.preprocess import crop_or_pad, to_pixels  # noqa: E402
from semrecon_core.encoders.protocol import SemanticEncoder  # noqa: E402


@pytest.fixture(scope="module")
def image_encoder(tiny_janus: Path) -> JanusImageEncoder:
    return JanusImageEncoder.from_pretrained(str(tiny_janus))


@pytest.fixture(scope="module")
def language_encoder(tiny_janus: Path) -> JanusLanguageEncoder:
    return JanusLanguageEncoder.from_pretrained(str(tiny_janus))


def _image(slices: int = 1, y: int = 40, x: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(slices, y, x, generator=g), torch.randn(slices, y, x, generator=g))


def test_preprocessing_maps_pads_after_mapping_and_has_finite_gradients_at_zero() -> None:
    image = torch.zeros(2, 6, 10, dtype=torch.complex64)
    image[0, 2, 3] = 3 + 4j
    image.requires_grad_(True)
    pixels = to_pixels(image, (8, 8))
    assert pixels.shape == (2, 3, 8, 8)
    # centre crop of x (10 → 8) and zero-pad of y (6 → 8, one row each side, value 0 after mapping)
    assert torch.all(pixels[:, :, 0] == 0) and torch.all(pixels[:, :, -1] == 0)
    assert pixels[0, 0, 3, 2].item() == pytest.approx(1.0)  # the maximum maps to +1
    assert pixels[0, 0, 4, 4].item() == pytest.approx(-1.0)  # zero magnitude maps to −1
    assert torch.all(pixels[1, :, 1:-1] == -1)  # an all-zero slice stays finite
    pixels.sum().backward()
    assert torch.isfinite(torch.view_as_real(image.grad)).all()


def test_crop_or_pad_does_not_resample() -> None:
    image = torch.arange(7 * 9, dtype=torch.float32).reshape(1, 7, 9)
    cropped = crop_or_pad(image, (3, 5))
    assert torch.equal(cropped, image[:, 2:5, 2:7])
    padded = crop_or_pad(image, (9, 12))
    assert torch.equal(padded[:, 1:8, 1:10], image) and padded.sum() == image.sum()


def test_tiny_checkpoint_loads_offline_and_is_labelled_random(tiny_janus: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = JanusImageEncoder.from_pretrained(str(tiny_janus), layers=(1, 13, 24))
    assert encoder.is_random and "RANDOM WEIGHTS" in encoder.label
    assert isinstance(encoder, SemanticEncoder)
    assert encoder.identity["layers"] == [1, 13, 24] and encoder.identity["random_weights"] is True
    processor = transformers.AutoProcessor.from_pretrained(tiny_janus, local_files_only=True)
    assert type(processor).__name__ == "JanusProcessor" and processor.num_image_tokens == 144
    assert processor.tokenizer.image_token == "<image_placeholder>"


def test_vision_tower_alone_loads_the_checkpoints_vision_weights(tiny_janus: Path, image_encoder) -> None:
    full = transformers.JanusForConditionalGeneration.from_pretrained(tiny_janus, local_files_only=True)
    ours, reference = image_encoder.vision.state_dict(), full.model.vision_model.state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_hidden_state_indexing_matches_the_public_code_layers(image_encoder: JanusImageEncoder) -> None:
    pixels = image_encoder.pixels(_image())
    with torch.no_grad():
        reference = image_encoder.vision(pixels, output_hidden_states=True).hidden_states
        ours = image_encoder.encode_pixels(pixels)
    assert len(reference) == 25
    for level, layer in enumerate((1, 13, 24)):
        assert torch.allclose(ours[level], reference[layer], atol=1e-5), layer
    # hidden_states[24] is before the final LayerNorm: last_hidden_state is not.
    assert not torch.allclose(ours[2], image_encoder.vision(pixels).last_hidden_state, atol=1e-3)


def test_gradients_reach_the_complex_image_and_weights_stay_frozen(image_encoder: JanusImageEncoder) -> None:
    image = _image(2).requires_grad_(True)
    features = image_encoder.encode(image)
    assert [f.shape for f in features] == [(2, 144, 32)] * 3
    sum(f.square().mean() for f in features).backward()
    grad = torch.view_as_real(image.grad)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in image_encoder.vision.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_janus: Path, image_encoder: JanusImageEncoder) -> None:
    checkpointed = JanusImageEncoder.from_pretrained(str(tiny_janus), gradient_checkpointing=True)
    grads = []
    for encoder in (image_encoder, checkpointed):
        image = _image(seed=3).requires_grad_(True)
        encoder.encode(image)[-1].square().mean().backward()
        grads.append(image.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_image_only_encoder_computes_in_float32_even_under_an_enclosing_autocast(
    tiny_janus: Path, image_encoder: JanusImageEncoder
) -> None:
    assert image_encoder.precision == "float32" and image_encoder.identity["dtype"] == "float32"
    # bfloat16 takes effect on CUDA only: asked for on the CPU, the encoder still computes in float32
    asked = JanusImageEncoder.from_pretrained(str(tiny_janus), precision="bfloat16")
    assert asked.precision == "bfloat16" and asked.dtype == torch.float32 and asked.identity["dtype"] == "float32"
    pixels = image_encoder.pixels(_image(seed=5))
    with torch.no_grad():
        reference = image_encoder.encode_pixels(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as an engine's autocast around the prior would be
            inside = image_encoder.encode_pixels(pixels)
            leaked = image_encoder.vision(pixels, output_hidden_states=True).hidden_states[24]
    assert all(torch.equal(a, b) for a, b in zip(reference, inside, strict=True))
    assert not torch.allclose(leaked, reference[2], atol=1e-4)  # unguarded, autocast reaches the tower
    with pytest.raises(ValueError, match="precision"):
        JanusImageEncoder.from_pretrained(str(tiny_janus), precision="float16")


def test_language_encoder_asks_for_bfloat16_which_only_cuda_honours(language_encoder: JanusLanguageEncoder) -> None:
    assert language_encoder.precision == "bfloat16"
    assert language_encoder.dtype == torch.float32 and language_encoder.identity["dtype"] == "float32"


@pytest.mark.cuda
def test_on_cuda_image_only_is_float32_and_the_llm_path_bfloat16(tiny_janus: Path) -> None:
    image = JanusImageEncoder.from_pretrained(str(tiny_janus), device="cuda")
    assert image.identity["dtype"] == "float32" and next(image.vision.parameters()).dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        states = image.encode_pixels(image.pixels(_image(seed=6)))
    cpu = JanusImageEncoder.from_pretrained(str(tiny_janus))
    reference = cpu.encode_pixels(cpu.pixels(_image(seed=6)))
    assert torch.allclose(states[-1].cpu(), reference[-1], rtol=1e-3, atol=1e-4)
    language = JanusLanguageEncoder.from_pretrained(str(tiny_janus), device="cuda")
    assert language.identity["dtype"] == "bfloat16" and next(language.model.parameters()).dtype == torch.bfloat16
    off = JanusLanguageEncoder.from_pretrained(str(tiny_janus), device="cuda", autocast=False)
    assert off.identity["dtype"] == "float32"
    assert torch.isfinite(language.encode(_image().cuda())[0]).all()


def test_layers_outside_the_model_are_rejected(tiny_janus: Path) -> None:
    with pytest.raises(ValueError, match="layers"):
        JanusImageEncoder.from_pretrained(str(tiny_janus), layers=(1, 30))


def test_language_embedding_equals_the_models_own_forward(language_encoder: JanusLanguageEncoder) -> None:
    image = _image()
    pixels = language_encoder.pixels(image)
    with torch.no_grad():
        ours = language_encoder.encode(image)[0]
        reference = language_encoder.model.model(
            input_ids=language_encoder.input_ids[None], pixel_values=pixels
        ).last_hidden_state[:, -1]
    assert ours.shape == (1, 64)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_perturbations_touch_text_tokens_only(language_encoder: JanusLanguageEncoder) -> None:
    image = _image()
    mask = language_encoder.text_mask()
    assert int((~mask).sum()) == language_encoder.num_image_tokens
    assert torch.all(language_encoder.input_ids[~mask] == language_encoder.model.config.image_token_id)
    clean = language_encoder.encode(image)[0]
    zero = language_encoder.encode_perturbed(image, count=2, sigma=0.0)
    assert torch.allclose(zero[0], clean.expand(2, -1), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    noisy = language_encoder.encode_perturbed(image, count=3, sigma=0.5, generator=g)
    assert noisy.shape == (1, 3, 64) and not torch.allclose(noisy[0, 0], noisy[0, 1])


def test_language_gradients_reach_the_image(language_encoder: JanusLanguageEncoder) -> None:
    image = _image().requires_grad_(True)
    language_encoder.encode(image)[0].square().sum().backward()
    assert torch.isfinite(torch.view_as_real(image.grad)).all() and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in language_encoder.model.parameters())


def _word_logp_by_hand(encoder: JanusLanguageEncoder, image: torch.Tensor, word: str) -> torch.Tensor:
    """log P(reply starts with ``word``): each spelling teacher-forced through the full model, no cache."""
    pixels = encoder.pixels(image)
    length = encoder.input_ids.numel()
    totals = []
    for spelling in encoder.word_spellings(word):
        ids = torch.cat([encoder.input_ids, torch.tensor(spelling[:-1], dtype=torch.long)])
        with torch.no_grad():
            logits = encoder.model(input_ids=ids[None], pixel_values=pixels).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        totals.append(sum(logp[length - 1 + t, token] for t, token in enumerate(spelling)))
    return torch.logsumexp(torch.stack(totals), 0)


def test_answer_scores_whole_words_as_a_hand_computation_from_the_logits(
    language_encoder: JanusLanguageEncoder,
) -> None:
    image = _image(2)
    # "high-quality" is three sub-tokens for the tiny word-level tokenizer (high, -, quality): every one counts
    words = ("high-quality", "low-quality")
    spellings = language_encoder.word_spellings("high-quality")
    assert len(spellings) == 2 and all(len(ids) == 3 for ids in spellings)  # as given and capitalised
    answers = language_encoder.answer(image, choices=words, max_new_tokens=3)
    assert len(answers) == 2
    for index, result in enumerate(answers):
        expected = torch.stack([_word_logp_by_hand(language_encoder, image[index : index + 1], w) for w in words])
        probabilities = torch.softmax(expected, 0)
        for word, logp, p in zip(words, expected.tolist(), probabilities.tolist(), strict=True):
            assert result[f"logp_{word}"] == pytest.approx(logp, abs=1e-4)
            assert result[f"p_{word}"] == pytest.approx(p, abs=1e-4)
        assert result["choice"] == words[int(probabilities.argmax())]
    # scoring multi-token words leaves the cache as it was: the greedy reply is the same as without them
    assert [a["answer"] for a in answers] == [a["answer"] for a in language_encoder.answer(image, max_new_tokens=3)]
    # the first sub-token alone would give another number: the check can tell
    first_only = torch.stack([_word_logp_by_hand(language_encoder, image[:1], w) for w in ("high", "low")])
    whole = torch.tensor([answers[0]["logp_high-quality"], answers[0]["logp_low-quality"]], dtype=torch.float64)
    assert not torch.allclose(first_only, whole, atol=1e-3)


def test_answer_defaults_to_the_instruction_words_and_decodes_greedily(language_encoder: JanusLanguageEncoder) -> None:
    image = _image(2)
    answers = language_encoder.answer(image, max_new_tokens=3)
    first = answers[0]
    expected = torch.stack([_word_logp_by_hand(language_encoder, image[:1], w) for w in ("high", "low")])
    assert first["logp_high"] == pytest.approx(expected[0].item(), abs=1e-4)
    assert first["p_high"] == pytest.approx(torch.softmax(expected, 0)[0].item(), abs=1e-4)
    assert first["p_high"] + first["p_low"] == pytest.approx(1.0)
    assert first["choice"] in ("high", "low") and isinstance(first["answer"], str)
    # The cached greedy decoding equals a plain greedy loop that re-runs the whole sequence each step.
    lm = language_encoder.model.model.language_model
    with torch.no_grad():
        sequence = language_encoder.merged_embeddings(language_encoder.pixels(image[:1]))
        tokens = []
        for _ in range(3):
            token = int(language_encoder.model.lm_head(lm(inputs_embeds=sequence).last_hidden_state[0, -1]).argmax())
            if token == language_encoder.tokenizer.eos_token_id:
                break
            tokens.append(token)
            sequence = torch.cat([sequence, lm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    assert first["answer"] == language_encoder.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="cannot spell"):
        language_encoder.answer(image, choices=("zzzunknownword", "low"))


PUBLIC_CODE_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.\n\n"
    "User: <image_placeholder>\n"
    "Determine whether this image is high-quality or low-quality. Respond with single word.\n\n"
    "Assistant:"
)


def test_public_code_prompt_is_rendered_as_the_authors_vlchatprocessor_does(tiny_janus: Path) -> None:
    encoder = JanusLanguageEncoder.from_pretrained(str(tiny_janus), instruction="public-code")
    assert encoder.prompt == PUBLIC_CODE_PROMPT
    assert encoder.identity["prompt"] == "public-code" and encoder.choices == ("high", "low")
    # tokenised with the BOS token, then the one image tag becomes boi + 144 image tokens + eoi
    tok = encoder.tokenizer
    ids = tok(PUBLIC_CODE_PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    tag = ids.index(encoder.model.config.image_token_id)
    boi, eoi = tok.convert_tokens_to_ids(["<begin_of_image>", "<end_of_image>"])
    expected = [*ids[:tag], boi, *[encoder.model.config.image_token_id] * 144, eoi, *ids[tag + 1 :]]
    assert encoder.input_ids.tolist() == expected and encoder.image_start == tag + 1
    blurred = JanusLanguageEncoder.from_pretrained(str(tiny_janus), instruction="public-code-blurred-vs-aliasing")
    assert blurred.prompt.endswith(
        "\n\nUser: <image_placeholder>\n"
        "Determine whether this image is blurred or aliasing. Respond with single word.\n\nAssistant:"
    )
    assert blurred.choices == ("blurred", "aliasing")


def test_paper_prompt_keeps_janus_pro_roles_and_matches_the_processor_expansion(
    language_encoder: JanusLanguageEncoder,
) -> None:
    assert language_encoder.prompt == PUBLIC_CODE_PROMPT.replace("User:", "<|User|>:").replace(
        "Assistant:", "<|Assistant|>:"
    ).replace(" Respond with single word.", "")
    assert language_encoder.identity["prompt"] == "janus-pro"
    # expanding after tokenisation (VLChatProcessor) equals tokenising the expanded text (JanusProcessor)
    expanded = language_encoder.prompt.replace(
        "<image_placeholder>", "<begin_of_image>" + "<image_placeholder>" * 144 + "<end_of_image>"
    )
    assert language_encoder.input_ids.tolist() == language_encoder.tokenizer(expanded)["input_ids"]


def test_missing_weights_give_a_clear_offline_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EncoderUnavailable, match="allow_download=true"):
        JanusImageEncoder.from_pretrained("deepseek-community/Janus-Pro-1B")
    with pytest.raises(EncoderUnavailable, match="no such directory"):
        JanusImageEncoder.from_pretrained(str(tmp_path / "missing.dir"))


def test_generic_hf_vision_encoder_follows_the_protocol(tmp_path: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    encoder = HFVisionEncoder.from_pretrained(str(tmp_path / "siglip"), layers=(1, 3))
    assert isinstance(encoder, SemanticEncoder) and encoder.identity["family"] == "hf-vision"
    image = _image(2, 50, 70).requires_grad_(True)
    features = encoder.encode(image)
    with torch.no_grad():
        reference = encoder.vision(pixel_values=to_pixels(image.detach(), (64, 64)), output_hidden_states=True)
    assert [f.shape for f in features] == [(2, 16, 32)] * 2
    assert torch.allclose(features[1], reference.hidden_states[3], atol=1e-5)
    features[1].sum().backward()
    assert torch.isfinite(torch.view_as_real(image.grad)).all()


def test_instruction_sets() -> None:
    assert len(instructions.TABLE_S1) == 20 == len(set(instructions.TABLE_S1))
    assert instructions.TABLE_S1[0] == instructions.PAPER
    public = instructions.resolve("public-code")
    assert public.text == instructions.PAPER + " Respond with single word." and public.prompt == "public-code"
    assert instructions.resolve("blurred-vs-aliased").words == ("blurred", "aliased")
    assert instructions.resolve("public-code-blurred-vs-aliasing").words == ("blurred", "aliasing")
    assert instructions.resolve("Is it sharp?") == instructions.Instruction(
        "Is it sharp?", ("high", "low"), "janus-pro"
    )
    # text read back from a bank's metadata is the named instruction, with its words and rendering
    assert (
        instructions.resolve(instructions.PUBLIC_CODE_BLURRED_VS_ALIASING)
        == instructions.NAMED["public-code-blurred-vs-aliasing"]
    )


def test_cli_encoder_tiny(tmp_path: Path, capsys) -> None:
    from semrecon_core.commands.main import main

    assert main(["encoder", "tiny", str(tmp_path / "t")]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    assert (tmp_path / "t" / "model.safetensors").is_file()
    assert main(["encoder", "tiny", str(tmp_path / "t")]) == 2
    assert "not empty" in capsys.readouterr().err
