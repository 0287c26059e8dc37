"""Offline stand-ins for Gadgetron: what runs the scanner runtime (:mod:`semrecon_core.gadgetron`) without it.

- :mod:`~semrecon_core.emulation.chain`: XML chains parsed, and run in-process with Python equivalents of
  the C++ gadgets; an ``<external>`` node runs its target through an in-process connection.
- :mod:`~semrecon_core.emulation.replay`: a chain run on an ISMRMRD raw file (``semrecon replay``).
- :mod:`~semrecon_core.emulation.emulator`: the Gadgetron side of an ``<external>`` / ``<connect>`` node
  (launches ``python -m gadgetron`` or reaches ``semrecon serve``) over the real wire format.
- :mod:`~semrecon_core.emulation.wire`: that wire format, framed by ``ismrmrd.serialization`` and
  gadgetron-python.

This package imports from :mod:`semrecon_core.gadgetron`, never the reverse: the scanner imports none of it.
Nothing here imports ``gadgetron`` or torch at package import time.
"""
