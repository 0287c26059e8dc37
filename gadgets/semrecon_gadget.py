"""semrecon Gadgetron gadget: vision-language-guided reconstruction of buffered k-space.

Gadgetron imports this module from ``$GADGETRON_HOME/share/gadgetron/python`` for
``<execute name="semrecon_gadget" target="reconstruct" type="python"/>`` (see config/semrecon_*.xml).

Input: ``ReconData`` from BucketToBufferGadget (data ``[E0, E1, E2, CHA, N, S, LOC]`` complex64, optional
``ref`` calibration buffer, acquisition headers ``[E1, E2, N, S, LOC]``). Output: one float32 magnitude
``ismrmrd.Image`` per slice / repetition (recon matrix, geometry and indices of the acquisitions, meta
naming backbone, prior and encoder). Other messages pass through. The ``<configuration>`` properties are
the fields of ``semrecon_core.config.ReconConfig`` plus ``series_index``; they are validated before the
first buffer is read. A buffer that cannot be reconstructed yields a logged error and a labelled
CG-SENSE (or zero-filled RSS) fallback image; the scan continues.

The logic lives in :mod:`semrecon_core.gadgetron.gadget`. The fixes for the known defects of
gadgetron-python 1.4.1 (:mod:`semrecon_core.gadgetron.compat`: no spinning on a closed socket, claimed
sizes checked before anything is allocated, unknown message ids refused by name) are installed at
interpreter start-up by ``sitecustomize.py`` of this directory, before gadgetron-python reads CONFIG and
HEADER; importing this module installs them as well, for interpreters where that hook is shadowed.
A scan that cannot go on (bad properties, a refused message) is reported to Gadgetron as an ERROR and
the process exits with status 2; if Gadgetron goes away the process exits with status 3.
"""

from semrecon_core.gadgetron import compat
from semrecon_core.gadgetron.gadget import SemreconGadget, reconstruct

compat.install()

__all__ = ["SemreconGadget", "reconstruct"]
