r"""Language instructions of the image-language prior and the prompts they are rendered into.

``PAPER`` is the paper's instruction (§2.4 / Figure 7); ``PUBLIC_CODE`` is the authors' public code's
variant (the paper's text + " Respond with single word."). ``TABLE_S1`` holds the 20 semantically
equivalent instructions of the paper's Supporting Information Table S1, transcribed from the supporting
table in ``paper/`` (the text extraction of row 2 carries stray row numbers, "2 3 4 5", which are dropped
here). ``BLURRED_VS_ALIASED`` is the instruction of the paper's second image-language experiment (Figure 8);
``PUBLIC_CODE_BLURRED_VS_ALIASING`` is the public code's wording of it.

Prompts follow the DeepSeek conversation format of the original Janus code (``deepseek`` SFT style: system
prompt, a blank line, ``<role>: <message>`` turns separated by blank lines, an empty assistant turn ending
in ``:``). Two renderings differ only in the role names:

* ``janus-pro``: Janus-Pro's documented roles ``<|User|>`` / ``<|Assistant|>``;
* ``public-code``: the roles the authors' scripts write literally, ``User`` / ``Assistant``, passed through
  Janus's own ``VLChatProcessor`` (not transformers' chat template)::

      <system prompt>\n\nUser: <image_placeholder>\n{instruction}\n\nAssistant:

  The tokenizer then adds its BOS token and the single image tag becomes ``<begin_of_image>``, one
  ``<image_placeholder>`` per image token (576 for Janus-Pro) and ``<end_of_image>``.

Each named instruction carries its rendering and the two answer words whose probabilities ``answer()``
reports; literal text gets ``janus-pro`` and the words ``high`` / ``low``.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "Determine whether this image is high-quality or low-quality."
PUBLIC_CODE = PAPER + " Respond with single word."
BLURRED_VS_ALIASED = "Determine whether this image is blurred or aliased."
PUBLIC_CODE_BLURRED_VS_ALIASING = "Determine whether this image is blurred or aliasing. Respond with single word."

# The default system prompt of Janus's VLChatProcessor.
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
IMAGE_TAG = "<image_placeholder>"
# prompt rendering -> (user role, assistant role)
ROLES: dict[str, tuple[str, str]] = {
    "janus-pro": ("<|User|>", "<|Assistant|>"),
    "public-code": ("User", "Assistant"),
}

TABLE_S1: tuple[str, ...] = (
    "Determine whether this image is high-quality or low-quality.",
    "Decide if the image is best described as high-quality or low-quality.",
    "Does this image appear high or low quality?",
    "Assess whether this image is high quality or low quality.",
    "Decide if the image appears high quality or low quality.",
    "Evaluate whether the image is high-quality or low-quality.",
    "Indicate if this image represents high quality or low quality.",
    "Choose whether this image fits high quality or low quality.",
    "Check whether this image is high-quality or low-quality.",
    "Is the image high or low quality?",
    "Provide a classification of the image quality: high or low.",
    "Give a classification of the image quality: high or low.",
    "Does this look like a high-quality or low-quality image?",
    "Would you judge the image as high-quality or low-quality?",
    "Is the quality of this image high-quality or low-quality?",
    "Decide whether the image looks high-quality or low-quality.",
    "Assess whether the overall appearance is high-quality or low-quality.",
    "Indicate whether this image is high-quality or low-quality.",
    "Decide if the image should be judged high-quality or low-quality.",
    "Classify the image quality: high or low.",
)


@dataclass(frozen=True)
class Instruction:
    """An instruction, the two answer words it asks the model to choose between, and its prompt rendering."""

    text: str
    words: tuple[str, str] = ("high", "low")
    prompt: str = "janus-pro"

    def render(self, image_tag: str = IMAGE_TAG) -> str:
        """The prompt text with one ``image_tag`` where the image goes (before tokenisation)."""
        user, assistant = ROLES[self.prompt]
        return f"{SYSTEM_PROMPT}\n\n{user}: {image_tag}\n{self.text.strip()}\n\n{assistant}:"


NAMED: dict[str, Instruction] = {
    "paper": Instruction(PAPER),
    "public-code": Instruction(PUBLIC_CODE, prompt="public-code"),
    "blurred-vs-aliased": Instruction(BLURRED_VS_ALIASED, ("blurred", "aliased")),
    "public-code-blurred-vs-aliasing": Instruction(
        PUBLIC_CODE_BLURRED_VS_ALIASING, ("blurred", "aliasing"), prompt="public-code"
    ),
}
NAMED.update({f"table-s1-{i}": Instruction(text) for i, text in enumerate(TABLE_S1, start=1)})


def resolve(name_or_text: str) -> Instruction:
    """The instruction named ``name_or_text`` in :data:`NAMED`, or given as text.

    Text equal to a named instruction's text is that instruction (so an instruction read back from a bank's
    metadata keeps its answer words and rendering); other text gets ``high`` / ``low`` and ``janus-pro``.
    """
    if name_or_text in NAMED:
        return NAMED[name_or_text]
    if not name_or_text.strip():
        raise ValueError("instruction: expected a name (" + ", ".join(list(NAMED)[:4]) + ", ...) or text, found ''")
    for instruction in NAMED.values():
        if instruction.text == name_or_text:
            return instruction
    return Instruction(name_or_text)
