"""Semantic encoders: frozen vision and vision-language models that map an MR image to embeddings.

Every encoder follows :class:`~semrecon_core.encoders.protocol.SemanticEncoder`. The Janus encoders
(``janus.py``) and the generic HuggingFace vision encoder (``hf_vision.py``) import transformers only
when they are built, so importing this package stays cheap.
"""

from semrecon_core.encoders.protocol import SemanticEncoder

__all__ = ["SemanticEncoder"]
