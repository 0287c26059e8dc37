"""Gadgetron-facing pieces shared by ``gadgets/`` and the CLI.

- :mod:`~semrecon_core.gadgetron.properties`: ``<configuration>`` properties → validated settings.
- :mod:`~semrecon_core.gadgetron.gadget`: the gadget's target (ReconData → images, fallbacks, pass-through).
- :mod:`~semrecon_core.gadgetron.chain`: XML chains and in-process Python equivalents of the C++ gadgets.
- :mod:`~semrecon_core.gadgetron.replay`: ``semrecon replay`` (offline runs of a chain on an ISMRMRD file).
- :mod:`~semrecon_core.gadgetron.protocol`, :mod:`~semrecon_core.gadgetron.emulator`,
  :mod:`~semrecon_core.gadgetron.serve`: the wire protocol, a Gadgetron-side emulator and ``semrecon serve``.

Nothing here imports ``gadgetron`` or torch at package import time.
"""
