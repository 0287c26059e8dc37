"""``semrecon replay IN.h5 OUT.h5``: run a Gadgetron chain offline on an ISMRMRD raw file.

The chain runs as :func:`semrecon_core.emulation.replay.replay` runs it (the gadget in this process, or
with ``--protocol`` in a child process over the wire protocol). The images that leave the chain are
written to ``OUT.h5`` (one group ``image_<series>`` per series, atomically, with the scan's header), and
with ``--png`` as one PNG per image, with ``--dicom`` as one DICOM MR series per image series
(:func:`semrecon_core.data.dicom.write_dicom_series`); all of them are committed together or not at all, mode
0644 less the umask. ``IN.h5`` is opened read-only, and an output that names it is refused before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from semrecon_core.data.images import StagedOutputs


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
        "--dicom", metavar="DIR", help="also write one DICOM MR series per image series into DIR (new or replaced)"
    )
    parser.add_argument(
        "--protocol",
        action="store_true",
        help="run the gadget in a child process over the Gadgetron wire protocol (emulator)",
    )
    parser.add_argument("--group", default="dataset", help="HDF5 group of the input and output (default: dataset)")


def run(args: argparse.Namespace) -> int:
    """``semrecon replay``: replay, write the images, report."""
    from semrecon_core.emulation.replay import replay
    from semrecon_core.gadgetron.properties import parse_assignments

    _check_outputs(args)
    overrides = parse_assignments(args.set)
    result = replay(args.input, chain=args.config, overrides=overrides, protocol=args.protocol, group=args.group)
    if not result.images:
        raise ValueError(f"{args.input}: the chain produced no images")
    series: dict[int, list[Path]] = {}
    # the images file, the PNGs and the DICOM files are staged and committed together: a failure leaves none
    with StagedOutputs() as staged:
        counts = write_image_groups(
            args.output, result.images, group=args.group, xml_header=result.xml_header, staged=staged
        )
        paths = write_pngs(args.png, result.images, staged=staged) if args.png else []
        if args.dicom:
            from semrecon_core.data.dicom import write_dicom_series

            series = write_dicom_series(args.dicom, result.images, xml_header=result.xml_header, staged=staged)
    groups = ", ".join(f"{args.group}/{name} ({n})" for name, n in counts.items())
    print(f"{len(result.images)} image(s) in {result.seconds:.1f} s → {args.output}: {groups}")
    if args.png:
        print(f"{len(paths)} PNG(s) → {args.png}")
    if args.dicom:
        print(f"{sum(map(len, series.values()))} DICOM file(s) in {len(series)} series → {args.dicom}")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output (``OUT``, ``--png``) that is the input file (a path to it, a link or a hard link)."""
    source = Path(args.input)
    for option, path in (("OUT", args.output), ("--png", args.png), ("--dicom", args.dicom)):
        if path is not None and _same_file(Path(path), source):
            raise ValueError(f"{option} {path}: would overwrite the input file {args.input}")
    if args.dicom:
        from semrecon_core.data.dicom import check_dicom_directory

        check_dicom_directory(args.dicom, others={"OUT": args.output, "--png": args.png})


def _same_file(path: Path, source: Path) -> bool:
    if path.resolve() == source.resolve():
        return True
    try:
        return path.samefile(source)
    except OSError:  # either does not exist (yet)
        return False


def write_image_groups(
    path: str | Path,
    images: list[Any],
    *,
    group: str = "dataset",
    xml_header: str | None = None,
    staged: StagedOutputs | None = None,
) -> dict[str, int]:
    """Write ``images`` to a new ISMRMRD file, one image group ``image_<series>`` per series.

    The file is written atomically (committed with the other ``staged`` outputs when given), with the scan's
    ``xml_header`` when given. Returns ``{group name: number of images}``.
    """
    import ismrmrd

    counts: dict[str, int] = {}
    with _staging(staged) as outputs:
        temp = outputs.path(path)
        dataset = ismrmrd.Dataset(str(temp), group, create_if_needed=True, mode="w")
        try:
            if xml_header:
                dataset.write_xml_header(xml_header.encode("utf-8"))
            for image in images:
                name = f"image_{image.image_series_index}"
                dataset.append_image(name, image)
                counts[name] = counts.get(name, 0) + 1
        finally:
            dataset.close()
    return counts


def write_pngs(directory: str | Path, images: list[Any], *, staged: StagedOutputs | None = None) -> list[Path]:
    """One 8-bit PNG per image (magnitude scaled to its 99.5th percentile) in ``directory`` (created if needed).

    Written atomically, all or none (committed with the other ``staged`` outputs when given).
    """
    import numpy as np
    from PIL import Image

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"--png {directory}: exists and is not a directory")
    paths = []
    for image in images:
        pixels = np.abs(np.asarray(image.data, dtype=np.float64)).reshape(-1, *image.data.shape[-2:])[0]
        top = float(np.percentile(pixels, 99.5)) or 1.0
        grey = (np.clip(pixels / top, 0, 1) * 255).round().astype(np.uint8)
        target = directory / (
            f"series{image.image_series_index:03d}_image{image.image_index:04d}"
            f"_slice{image.slice:03d}_rep{image.repetition:03d}.png"
        )
        with _staging(staged) as outputs:
            Image.fromarray(grey).save(outputs.path(target, mkdir=True), format="PNG")
        paths.append(target)
    return paths


@contextlib.contextmanager
def _staging(staged: StagedOutputs | None) -> Iterator[StagedOutputs]:
    """``staged`` itself (committed by its owner), or a new set committed when the block ends."""
    if staged is not None:
        yield staged
    else:
        with StagedOutputs() as own:
            yield own
