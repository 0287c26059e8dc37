"""The scanner runtime: what Gadgetron's Python process imports, and nothing offline.

- :mod:`~semrecon_core.gadgetron.properties`: ``<configuration>`` properties → validated settings.
- :mod:`~semrecon_core.gadgetron.gadget`: the gadget's target (ReconData → the pipeline → images, labelled
  fallbacks, pass-through of every other message).
- :mod:`~semrecon_core.gadgetron.compat`: fixes for gadgetron-python 1.4.1, installed on import of the gadget.
- :mod:`~semrecon_core.gadgetron.serve`: the warm server for ``<connect>`` chains (``semrecon serve``).

The offline emulation (chains, replay, the Gadgetron-side emulator) lives in :mod:`semrecon_core.emulation`.
Nothing here imports ``gadgetron`` or torch at package import time.
"""
