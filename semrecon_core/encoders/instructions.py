"""Language instructions for the image-language prior.

``PAPER`` is the paper's instruction (§2.4 / Figure 7); ``PUBLIC_CODE`` is the authors' public code's
variant. ``TABLE_S1`` holds the 20 semantically equivalent instructions of the paper's Supporting
Information Table S1, transcribed from the supporting table in ``paper/`` (the text extraction of
row 2 carries stray row numbers, "2 3 4 5", which are dropped here). ``BLURRED_VS_ALIASED`` is the
instruction of the paper's second image-language experiment (Figure 8).
"""

from __future__ import annotations

PAPER = "Determine whether this image is high-quality or low-quality."
PUBLIC_CODE = PAPER + " Respond with single word."
BLURRED_VS_ALIASED = "Determine whether this image is blurred or aliased."

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

# name -> (instruction, the two answer words whose probabilities `answer()` reports)
NAMED: dict[str, tuple[str, tuple[str, str]]] = {
    "paper": (PAPER, ("high", "low")),
    "public-code": (PUBLIC_CODE, ("high", "low")),
    "blurred-vs-aliased": (BLURRED_VS_ALIASED, ("blurred", "aliased")),
}
NAMED.update({f"table-s1-{i}": (text, ("high", "low")) for i, text in enumerate(TABLE_S1, start=1)})


def resolve(name_or_text: str) -> tuple[str, tuple[str, str]]:
    """An instruction and its two answer words from a name in :data:`NAMED` or literal text.

    Literal text gets the answer words ``("high", "low")``.
    """
    if name_or_text in NAMED:
        return NAMED[name_or_text]
    if not name_or_text.strip():
        raise ValueError("instruction: expected a name (" + ", ".join(list(NAMED)[:4]) + ", ...) or text, found ''")
    return name_or_text, ("high", "low")
