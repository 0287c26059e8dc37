"""``semrecon replay IN.h5 OUT.h5``: run a Gadgetron chain offline on an ISMRMRD raw file.

The acquisitions of ``IN.h5`` go through the chain's Python equivalents of the C++ gadgets
(:mod:`semrecon_core.gadgetron.chain`); the ``<external>`` node runs the semrecon gadget in this process
through an in-process connection, or with ``--protocol`` in a child process launched exactly as
Gadgetron launches it, over the real wire format (:mod:`semrecon_core.gadgetron.emulator`). The images
that leave the chain are written to ``OUT.h5`` (one group ``image_<series>`` per series, written
atomically), and optionally as PNGs. ``IN.h5`` is opened read-only.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semrecon_core.gadgetron.chain import (
    BUILTIN_MODULES,
    Chain,
    Node,
    Stage,
    merge_configuration,
    parse_chain,
    run_chain,
)
from semrecon_core.gadgetron.properties import settings_from_configuration

log = logging.getLogger(__name__)

# Acquisitions read from the HDF5 file at a time.
_BLOCK = 1024

# Used without --config: the reconstruction part of config/semrecon_cgsense.xml (float images out,
# no display conversion), with the gadget's default properties (CG-SENSE).
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
      <configuration/>
    </external>
    <gadget><name>ImageFinish</name><dll>gadgetron_mricore</dll><classname>ImageFinishGadget</classname></gadget>
  </stream>
</configuration>
"""


@dataclass
class ReplayResult:
    """What a replay produced: the images leaving the chain, the wall time in seconds, the chain run
    and the scan's ISMRMRD XML header."""

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
        count = int(rows.shape[0])
    except (KeyError, IndexError) as exc:
        file.close()
        raise ValueError(
            f"{path}: group '{group}' has no ISMRMRD header ('xml') or acquisitions ('data') ({exc})"
        ) from None
    if count == 0:
        file.close()
        raise ValueError(f"{path}: group '{group}' holds no acquisitions")
    text = header.decode("utf-8") if isinstance(header, bytes) else str(header)

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
    the Gadgetron-side emulator (a child process and the real wire format) instead of in-process.
    """
    parsed = parse_chain(DEFAULT_CHAIN if chain is None else chain)
    if overrides and parsed.external is None:
        raise ValueError(f"{parsed.source}: --set given but the chain has no <external> node to configure")
    node = parsed.external
    if node is not None and (node.module is None or node.module in BUILTIN_MODULES):
        # semrecon's own gadget: a bad property fails here, before any data are read
        settings_from_configuration(
            merge_configuration(node.configuration, overrides or {}),
            source=f"{parsed.source}: <external> configuration",
        )
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


def write_image_groups(
    path: str | Path, images: list[Any], *, group: str = "dataset", xml_header: str | None = None
) -> dict[str, int]:
    """Write ``images`` to a new ISMRMRD file, one image group ``image_<series>`` per series (atomic),
    with the scan's ``xml_header`` when given. Returns ``{group name: number of images}``.
    """
    import ismrmrd

    path = Path(path)
    counts: dict[str, int] = {}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
    os.close(fd)
    try:
        dataset = ismrmrd.Dataset(tmp, group, create_if_needed=True, mode="w")
        try:
            if xml_header:
                dataset.write_xml_header(xml_header.encode("utf-8"))
            for image in images:
                name = f"image_{image.image_series_index}"
                dataset.append_image(name, image)
                counts[name] = counts.get(name, 0) + 1
        finally:
            dataset.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return counts


def write_pngs(directory: str | Path, images: list[Any]) -> list[Path]:
    """One 8-bit PNG per image (magnitude scaled to its 99.5th percentile), written atomically."""
    import numpy as np
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in images:
        pixels = np.abs(np.asarray(image.data, dtype=np.float64)).reshape(-1, *image.data.shape[-2:])[0]
        top = float(np.percentile(pixels, 99.5)) or 1.0
        grey = (np.clip(pixels / top, 0, 1) * 255).round().astype(np.uint8)
        target = directory / (
            f"series{image.image_series_index:03d}_image{image.image_index:04d}"
            f"_slice{image.slice:03d}_rep{image.repetition:03d}.png"
        )
        tmp = target.with_name(f".{target.name}.tmp")
        Image.fromarray(grey).save(tmp, format="PNG")
        os.replace(tmp, target)
        paths.append(target)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``semrecon replay``."""
    parser.add_argument("input", help="ISMRMRD raw HDF5 file (.h5; noise scan optional)")
    parser.add_argument("output", help="ISMRMRD file to write the images to (one group image_<series> per series)")
    parser.add_argument(
        "--config",
        metavar="CHAIN.xml",
        help="Gadgetron chain (default: the CG-SENSE reconstruction chain without display conversion)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a property of the chain's <external> node (repeatable), e.g. --set backbone=unet",
    )
    parser.add_argument("--png", metavar="DIR", help="also write one PNG per image into DIR")
    parser.add_argument(
        "--protocol",
        action="store_true",
        help="run the gadget in a child process over the Gadgetron wire protocol (emulator)",
    )
    parser.add_argument("--group", default="dataset", help="HDF5 group of the input and output (default: dataset)")


def run(args: argparse.Namespace) -> int:
    """``semrecon replay``: replay, write the images, report."""
    from semrecon_core.gadgetron.properties import parse_assignments

    overrides = parse_assignments(args.set)
    result = replay(args.input, chain=args.config, overrides=overrides, protocol=args.protocol, group=args.group)
    if not result.images:
        raise ValueError(f"{args.input}: the chain produced no images")
    counts = write_image_groups(args.output, result.images, group=args.group, xml_header=result.xml_header)
    groups = ", ".join(f"{args.group}/{name} ({n})" for name, n in counts.items())
    print(f"{len(result.images)} image(s) in {result.seconds:.1f} s → {args.output}: {groups}")
    if args.png:
        paths = write_pngs(args.png, result.images)
        print(f"{len(paths)} PNG(s) → {args.png}")
    return 0


def _is_image(item: Any) -> bool:
    import ismrmrd

    return isinstance(item, ismrmrd.Image)


def _protocol_stage(header_xml: str) -> Callable[[Node, str], Stage]:
    """Stages that run ``<external>`` nodes through the Gadgetron-side emulator (child process / server)."""
    from semrecon_core.gadgetron import emulator

    def make(node: Node, configuration: str) -> Stage:
        external = emulator.ExternalNode(
            configuration=configuration,
            module=node.module,
            target=node.target,
            address=node.address,
            port=node.port,
        )

        def stage(items: Iterator[Any]) -> Iterator[Any]:
            run = emulator.run_chain_over_protocol(external, header_xml, items)
            for text in run.errors:
                log.error("replay: the gadget reported an error: %s", text)
            yield from run.items

        return stage

    return make
