"""Offline replay: a Gadgetron chain run on an ISMRMRD raw file (the library behind ``semrecon replay``).

The acquisitions of the file go through the chain's Python equivalents of the C++ gadgets
(:mod:`semrecon_core.emulation.chain`); the ``<external>`` node runs the semrecon gadget's own target
(:func:`semrecon_core.gadgetron.gadget.reconstruct`) in this process through an in-process connection,
or with ``protocol=True`` in a child process launched exactly as Gadgetron launches it, over the real wire
format (:mod:`semrecon_core.emulation.emulator`). Replay neither estimates coil maps nor builds images:
the gadget does, through the same pipeline on every path. The raw file is opened read-only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from semrecon_core.data.images import Display
from semrecon_core.emulation.chain import (
    BUILTIN_MODULES,
    Chain,
    Node,
    Stage,
    merge_configuration,
    parse_chain,
    run_chain,
)
from semrecon_core.gadgetron.properties import settings_from_configuration
from semrecon_core.settings import check_machine

log = logging.getLogger(__name__)

# Acquisitions read from the HDF5 file at a time.
_BLOCK = 1024

# Used without --config: the reconstruction part of config/semrecon_cgsense.xml (float images out,
# no display conversion, so the windows describe the float pixels), otherwise the gadget's default
# properties (CG-SENSE).
DEFAULT_CHAIN = """<?xml version="1.0" encoding="UTF-8"?>
<configuration>
  <version>2</version>
  <readers><reader><dll>gadgetron_core_readers</dll><classname>AcquisitionReader</classname></reader></readers>
  <writers><writer><dll>gadgetron_core_writers</dll><classname>ImageWriter</classname></writer></writers>
  <stream>
    <gadget><name>NoiseAdjust</name><dll>gadgetron_mricore</dll><classname>NoiseAdjustGadget</classname></gadget>
    <gadget><name>RemoveROOversampling</name><dll>gadgetron_mricore</dll>
      <classname>RemoveROOversamplingGadget</classname></gadget>
    <gadget><name>AccTrig</name><dll>gadgetron_mricore</dll><classname>AcquisitionAccumulateTriggerGadget</classname>
      <property name="trigger_dimension" value="repetition"/></gadget>
    <gadget><name>BucketToBuffer</name><dll>gadgetron_mricore</dll><classname>BucketToBufferGadget</classname>
      <property name="split_slices" value="true"/></gadget>
    <external>
      <execute name="semrecon_gadget" target="reconstruct" type="python"/>
      <configuration>
        <property name="display_max_value" value="0"/>
        <property name="display_max_intensity" value="0"/>
      </configuration>
    </external>
    <gadget><name>ImageFinish</name><dll>gadgetron_mricore</dll><classname>ImageFinishGadget</classname></gadget>
  </stream>
</configuration>
"""


@dataclass
class ReplayResult:
    """What a replay produced.

    Attributes:
        images: the images leaving the chain.
        seconds: wall time of the chain run.
        chain: the chain that ran.
        xml_header: the scan's ISMRMRD XML header.
    """

    images: list[Any]
    seconds: float
    chain: Chain
    xml_header: str


def read_raw(path: str | Path, group: str = "dataset") -> tuple[str, Iterator[Any], int]:
    """Open an ISMRMRD raw file read-only: ``(xml header, acquisition iterator, count)``.

    Acquisitions are read in blocks of :data:`_BLOCK` rows straight from ``<group>/data`` (the layout
    ``ismrmrd.Dataset`` writes), which is far faster than ``Dataset.read_acquisition`` one by one.
    """
    import h5py
    import ismrmrd

    from semrecon_core.data.buffers import check_header, check_readout_lengths, full_readout
    from semrecon_core.data.readers import check_acquisition_rows, naming

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 file ({exc})") from None
    try:
        header = file[f"{group}/xml"][0]
        rows = file[f"{group}/data"]
        check_acquisition_rows(rows, f"{path}: '{group}/data'")
        count = int(rows.shape[0])
    except ValueError:
        file.close()
        raise
    except (KeyError, IndexError) as exc:
        file.close()
        raise ValueError(
            f"{path}: group '{group}' has no ISMRMRD header ('xml') or acquisitions ('data') ({exc})"
        ) from None
    if count == 0:
        file.close()
        raise ValueError(f"{path}: group '{group}' holds no acquisitions")
    text = header.decode("utf-8") if isinstance(header, bytes) else str(header)
    try:
        heads = [ismrmrd.AcquisitionHeader.from_buffer_copy(head) for head in rows.fields("head")[:]]
        parsed = check_header(text, channels=int(heads[0].active_channels))
        check_readout_lengths(heads, str(path), full_readout(parsed))  # partial echoes count as full
    except (ValueError, OSError) as exc:
        file.close()
        raise ValueError(naming(str(path), exc)) from None

    def acquisitions() -> Iterator[Any]:
        try:
            for start in range(0, count, _BLOCK):
                for offset, row in enumerate(rows[start : start + _BLOCK]):
                    yield _acquisition(row, f"{path}: acquisition #{start + offset}")
        finally:
            file.close()

    return text, acquisitions(), count


def _acquisition(row: Any, where: str) -> Any:
    """An ``ismrmrd.Acquisition`` from one row (head, traj, data) of an ISMRMRD ``data`` dataset."""
    import ismrmrd
    import numpy as np

    head = ismrmrd.AcquisitionHeader.from_buffer_copy(row["head"])
    values = np.asarray(row["data"], dtype=np.float32)
    channels, samples = head.active_channels, head.number_of_samples
    if values.size != 2 * channels * samples:
        raise ValueError(f"{where}: {values.size // 2} complex samples, header says {channels} × {samples}")
    traj = None
    if head.trajectory_dimensions:
        traj = np.asarray(row["traj"], np.float32).reshape(samples, head.trajectory_dimensions)
    return ismrmrd.Acquisition(head, values.view(np.complex64).reshape(channels, samples), traj)


def replay(
    path: str | Path,
    *,
    chain: str | Path | None = None,
    overrides: dict[str, str] | None = None,
    protocol: bool = False,
    group: str = "dataset",
) -> ReplayResult:
    """Run ``chain`` (a file, XML text, or the default recon chain) on the raw file ``path``.

    ``overrides`` set properties of the ``<external>`` node; ``protocol`` runs the gadget through
    the Gadgetron-side emulator (a child process and the real wire format) instead of in-process. Properties that
    do not validate, or that this machine cannot satisfy (:func:`~semrecon_core.settings.check_machine`), raise
    a ``ConfigError`` naming them before the file is read.
    """
    parsed = parse_chain(DEFAULT_CHAIN if chain is None else chain)
    if overrides and parsed.external is None:
        raise ValueError(f"{parsed.source}: --set given but the chain has no <external> node to configure")
    node = parsed.external
    if node is not None and (node.module is None or node.module in BUILTIN_MODULES):
        # semrecon's own gadget: a bad property fails here, before any data are read
        settings = settings_from_configuration(
            merge_configuration(node.configuration, overrides or {}),
            source=f"{parsed.source}: <external> configuration",
        )
        check_display(parsed, settings.display)
        if not (protocol and node.port is not None):  # a <connect> server checks its own machine
            check_machine(settings.config)  # a device this machine lacks: MachineError, before any data are read
    header_xml, acquisitions, count = read_raw(path, group)
    external = _protocol_stage(header_xml) if protocol else None
    start = time.perf_counter()
    outputs = list(run_chain(parsed, header_xml, acquisitions, overrides=overrides, external=external))
    seconds = time.perf_counter() - start
    images = [item for item in outputs if _is_image(item)]
    if len(images) != len(outputs):
        log.warning("replay: %d non-image message(s) left the chain and are not written", len(outputs) - len(images))
    log.info("replay: %d acquisitions → %d images in %.2f s", count, len(images), seconds)
    return ReplayResult(images=images, seconds=seconds, chain=parsed, xml_header=header_xml)


def chain_display(chain: Chain) -> Display:
    """What the gadgets after the chain's ``<external>`` node do to its images' pixels."""
    nodes = list(chain.nodes)
    after = nodes[nodes.index(chain.external) + 1 :] if chain.external is not None else []
    values: dict[str, float] = {"max_value": 0.0, "max_intensity": 0.0}
    defaults = Display()
    for node in after:
        if node.classname == "AutoScaleGadget":
            values["max_value"] = float(node.properties.get("max_value", defaults.max_value))
            values["histogram_bins"] = int(float(node.properties.get("histogram_bins", defaults.histogram_bins)))
        elif node.classname == "FloatToUShortGadget":
            values["max_intensity"] = float(node.properties.get("max_intensity", defaults.max_intensity))
            values["min_intensity"] = float(node.properties.get("min_intensity", defaults.min_intensity))
    return Display(**values)  # type: ignore[arg-type]


def check_display(chain: Chain, display: Display) -> None:
    """Warn when the gadget's display properties do not describe the gadgets that follow it in ``chain``.

    The window meta would then not match the pixels that leave the chain (Gadgetron copies it into DICOM).
    """
    actual = chain_display(chain)
    if (actual.max_value, actual.max_intensity) != (display.max_value, display.max_intensity):
        log.warning(
            "%s: the <external> node's display_max_value %g / display_max_intensity %g do not match the gadgets "
            "after it (AutoScale max_value %g, FloatToUShort max_intensity %g; 0 = absent): its window meta "
            "will not describe the pixels that leave the chain",
            chain.source,
            display.max_value,
            display.max_intensity,
            actual.max_value,
            actual.max_intensity,
        )


def _is_image(item: Any) -> bool:
    import ismrmrd

    return isinstance(item, ismrmrd.Image)


def _protocol_stage(header_xml: str) -> Callable[[Node, str], Stage]:
    """Stages that run ``<external>`` nodes through the Gadgetron-side emulator (child process / server)."""
    from semrecon_core.emulation import emulator

    def make(node: Node, configuration: str) -> Stage:
        def stage(items: Iterator[Any]) -> Iterator[Any]:
            run = emulator.run_node(replace(node, configuration=configuration), header_xml, items)
            for text in run.errors:
                log.error("replay: the gadget reported an error: %s", text)
            yield from run.items

        return stage

    return make
