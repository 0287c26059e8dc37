"""The engines, one per backbone family, and the typed registry that finds them.

Imports stay lazy so that a classical reconstruction never imports the deep-learning stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from semrecon_core.config import Backbone
    from semrecon_core.engines.base import Engine


def get_engine(backbone: Backbone) -> Engine:
    """The engine that reconstructs with ``backbone``."""
    match backbone:
        case "zero-filled":
            from semrecon_core.engines.classical import zero_filled

            return zero_filled
        case "sense":
            from semrecon_core.engines.classical import sense

            return sense
        case "unet":
            from semrecon_core.engines.unet import reconstruct_unet

            return reconstruct_unet
        case "unrolled":
            from semrecon_core.engines.unrolled import reconstruct_unrolled

            return reconstruct_unrolled
        case "inr":
            from semrecon_core.engines.inr import reconstruct_inr

            return reconstruct_inr
    raise ValueError(f"property 'backbone': no engine for {backbone!r}")
