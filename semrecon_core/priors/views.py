"""Random views of an image for the semantic prior: an expectation over small shifts, flips and rescales.

A frozen vision encoder's gradient with respect to its input carries pixel-exact patterns of the encoder itself
(patch-grid checkerboards, straight lines along the patch rows): following it paints them into the image.
Feature visualisation and CLIP-guided generation average the objective over random jitter of the encoder
input so that only what survives small geometric changes is followed. :func:`random_views` makes those copies:
the first view is the image itself, each other one is the image flipped (left–right, with probability ½),
shifted by a whole number of pixels (up to :data:`MAX_SHIFT` along each axis, circularly: simulated and scanned
images have a margin of background around the anatomy) and rescaled about its centre by a factor in
[1 − :data:`MAX_ZOOM`, 1 + :data:`MAX_ZOOM`] (bilinear, cropped or zero-padded back to its size). Every step is
differentiable in the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semrecon_core.encoders.preprocess import crop_or_pad

MAX_SHIFT = 8
"""Largest shift of a view along each axis, in pixels (about half a DINOv2/Janus patch of 14–16 px)."""
MAX_ZOOM = 0.1
"""Largest relative change of scale of a view."""


def random_views(image: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` views of a complex ``(slices, y, x)`` image stacked as ``(count · slices, y, x)``, view-major.

    View 0 is ``image`` unchanged; views 1… draw their flip, shift and scale from ``generator`` (one draw per
    view, shared by its slices).
    """
    if count < 1:
        raise ValueError(f"views: expected at least 1, found {count}")
    views = [image]
    for _ in range(count - 1):
        flip, dy, dx, zoom = torch.rand(4, generator=generator).tolist()
        view = image.flip(-1) if flip < 0.5 else image
        view = torch.roll(view, shifts=(_shift(dy), _shift(dx)), dims=(-2, -1))
        views.append(rescale(view, 1.0 + MAX_ZOOM * (2.0 * zoom - 1.0)))
    return torch.cat(views)


def _shift(draw: float) -> int:
    return round(MAX_SHIFT * (2.0 * draw - 1.0))


def rescale(image: torch.Tensor, factor: float) -> torch.Tensor:
    """A complex ``(slices, y, x)`` image rescaled about its centre by ``factor``, at its own size."""
    height, width = image.shape[-2:]
    size = (max(round(height * factor), 1), max(round(width * factor), 1))
    if size == (height, width):
        return image
    parts = torch.view_as_real(image).permute(0, 3, 1, 2) if image.is_complex() else image.unsqueeze(1)
    scaled = F.interpolate(parts, size=size, mode="bilinear", align_corners=False)
    scaled = crop_or_pad(scaled, (height, width))
    if image.is_complex():
        return torch.view_as_complex(scaled.permute(0, 2, 3, 1).contiguous())
    return scaled.squeeze(1)
