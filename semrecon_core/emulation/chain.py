"""Gadgetron XML chains, parsed and run in-process.

:func:`parse_chain` reads a Gadgetron stream configuration (version 2 ``<configuration>`` with
``<readers>``, ``<writers>`` and ``<stream>``; the older ``<gadgetronStreamConfiguration>`` is read too)
into a :class:`Chain`. :func:`run_chain` runs it without Gadgetron: every C++ gadget the semrecon chains
use is replaced by a faithful Python equivalent —

- ``NoiseAdjustGadget``, ``AsymmetricEchoAdjustROGadget``, ``RemoveROOversamplingGadget``,
  ``AcquisitionAccumulateTriggerGadget``, ``BucketToBufferGadget``: :mod:`semrecon_core.data.buffers`;
- ``AutoScaleGadget``, ``FloatToUShortGadget``, ``ImageFinishGadget``: this module;

and an ``<external>`` node runs its Python target in this process through :class:`InProcessConnection`,
an object with the interface of ``gadgetron.external.Connection``. semrecon's own node (``semrecon_gadget``
or a ``<connect>`` to ``semrecon serve``) runs :func:`semrecon_core.gadgetron.gadget.reconstruct`, the
function the scanner runs. An unknown element, gadget or property is a :class:`ChainError` naming it and
the file.
"""

from __future__ import annotations

import importlib
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Stage = Callable[[Iterator[Any]], Iterator[Any]]


class ChainError(ValueError):
    """A chain file is malformed, or names a gadget, element or property semrecon cannot run."""


@dataclass(frozen=True)
class Node:
    """One element of a chain's ``<stream>``.

    Attributes:
        kind: ``gadget`` or ``external``.
        classname: the C++ class (gadgets) or ``external``.
        name: the node's ``<name>`` (gadgets), for messages.
        properties: ``name -> value`` of a gadget's properties (externals: of its ``<configuration>``).
        module, target: the ``<execute name=... target=...>`` of an external node (``None`` for connect).
        address, port: the ``<connect>`` of an external node (``None`` for execute).
        configuration: the external node's ``<configuration>`` element as XML text (sent verbatim).
    """

    kind: str
    classname: str
    name: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    module: str | None = None
    target: str | None = None
    address: str | None = None
    port: int | None = None
    configuration: str = "<configuration/>"


@dataclass(frozen=True)
class Chain:
    """A parsed chain: reader and writer class names and the stream's nodes in order."""

    source: str
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    nodes: tuple[Node, ...]

    @property
    def external(self) -> Node | None:
        """The (first) ``<external>`` node, if any."""
        return next((node for node in self.nodes if node.kind == "external"), None)


# gadget class -> {property: default}; only these gadgets and properties are accepted.
GADGETS: dict[str, dict[str, str]] = {
    "NoiseAdjustGadget": {},
    "AsymmetricEchoAdjustROGadget": {},
    "RemoveROOversamplingGadget": {},
    "AcquisitionAccumulateTriggerGadget": {"trigger_dimension": "", "sorting_dimension": ""},
    "BucketToBufferGadget": {
        "N_dimension": "",
        "S_dimension": "",
        "split_slices": "false",
        "verbose": "false",
    },
    "AutoScaleGadget": {"max_value": "2048", "histogram_bins": "100"},
    "FloatToUShortGadget": {"max_intensity": "4095", "min_intensity": "0", "intensity_offset": "2048"},
    "ImageFinishGadget": {},
}

READERS = (
    "AcquisitionReader",
    "WaveformReader",
    "GadgetIsmrmrdAcquisitionMessageReader",
    "GadgetIsmrmrdWaveformMessageReader",
)
WRITERS = (
    "ImageWriter",
    "MRIImageWriter",
    "ImageArrayWriter",
    "AcquisitionWriter",
    "WaveformWriter",
    "IsmrmrdImageArrayWriter",
    "GadgetIsmrmrdImageWriter",
)

# Encoding counters the accumulate / buffer gadgets can trigger on or map to N and S.
TRIGGER_DIMENSIONS = ("average", "slice", "contrast", "phase", "repetition", "set", "segment")

# Python modules Gadgetron would import from share/gadgetron/python that ship inside semrecon.
BUILTIN_MODULES = {"semrecon_gadget": "semrecon_core.gadgetron.gadget"}
# The target a <connect> node's server runs (``semrecon serve``).
CONNECT_TARGET = ("semrecon_core.gadgetron.gadget", "reconstruct")


def parse_chain(source: str | Path) -> Chain:
    """Parse a chain file (path) or XML text into a :class:`Chain`; raises :class:`ChainError`."""
    text, where = _read_source(source)
    try:
        root = _strip_namespaces(ET.fromstring(text))
    except ET.ParseError as exc:
        raise ChainError(f"{where}: not a valid XML chain ({exc})") from None
    if root.tag == "configuration":
        readers = tuple(_classname(r, where) for r in root.findall("readers/reader"))
        writers = tuple(_classname(w, where) for w in root.findall("writers/writer"))
        stream = root.find("stream")
        if stream is None:
            raise ChainError(f"{where}: <configuration> has no <stream>")
        elements = list(stream)
        allowed_top = {"version", "readers", "writers", "stream"}
    elif root.tag == "gadgetronStreamConfiguration":
        readers = tuple(_classname(r, where) for r in root.findall("reader"))
        writers = tuple(_classname(w, where) for w in root.findall("writer"))
        elements = root.findall("gadget")
        allowed_top = {"reader", "writer", "gadget"}
    else:
        raise ChainError(f"{where}: root element <{root.tag}>: expected <configuration> (Gadgetron 4 chain)")
    for child in root:
        if child.tag not in allowed_top:
            raise ChainError(f"{where}: unknown element <{child.tag}> in <{root.tag}>")
    for name in readers:
        if name not in READERS:
            raise ChainError(f"{where}: unknown reader '{name}' (known: {', '.join(READERS)})")
    for name in writers:
        if name not in WRITERS:
            raise ChainError(f"{where}: unknown writer '{name}' (known: {', '.join(WRITERS)})")
    nodes = tuple(_parse_node(element, where) for element in elements)
    if not nodes:
        raise ChainError(f"{where}: the stream is empty")
    return Chain(source=where, readers=readers, writers=writers, nodes=nodes)


def merge_configuration(configuration: str, overrides: dict[str, str]) -> str:
    """Return ``configuration`` XML with ``overrides`` set as ``<property name= value=/>`` elements."""
    root = ET.fromstring(configuration) if configuration.strip() else ET.Element("configuration")
    for name, value in overrides.items():
        for element in list(root.iter("property")):
            if (element.get("name") or (element.findtext("name") or "").strip()) == name:
                _remove(root, element)
        ET.SubElement(root, "property", {"name": name, "value": value})
    return ET.tostring(root, encoding="unicode")


class InProcessConnection:
    """Mimics ``gadgetron.external.Connection`` for a target run in this process.

    Iterating yields the incoming messages; ``send`` hands each outgoing message to ``sink`` after
    the same type check as gadgetron-python's writers (images make a round trip through their wire
    serialisation, so what the sink gets is what Gadgetron would read). ``header`` is the parsed
    ISMRMRD header, ``config`` the parsed ``<configuration>`` element, ``raw_bytes`` both as bytes.
    """

    class _Raw:
        def __init__(self, config: bytes, header: bytes) -> None:
            self.config = config
            self.header = header

    def __init__(self, items: Iterable[Any], header_xml: str, configuration: str, sink: Callable[[Any], None]) -> None:
        import ismrmrd

        self._items = iter(items)
        self._sink = sink
        self.raw_bytes = InProcessConnection._Raw(configuration.encode("utf-8"), header_xml.encode("utf-8"))
        self.header = ismrmrd.xsd.CreateFromDocument(header_xml)
        self.config: ET.Element | None
        try:
            self.config = ET.fromstring(configuration)
        except ET.ParseError:
            self.config = None
        self.filters: list[Callable[[Any], bool]] = []

    def __enter__(self) -> InProcessConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def __iter__(self) -> Iterator[Any]:
        for _, item in self.iter_with_mids():
            yield item

    def __next__(self) -> tuple[int, Any]:
        return self.next()

    def iter_with_mids(self) -> Iterator[tuple[int, Any]]:
        """Like ``Connection.iter_with_mids``: ``(message id, item)`` pairs passing the filters.

        Items that do not pass are sent straight back.
        """
        for item in self._items:
            if all(predicate(item) for predicate in self.filters):
                yield message_id(item), item
            else:
                self.send(item)

    def next(self) -> tuple[int, Any]:
        """The next ``(message id, item)`` passing the filters; :class:`StopIteration` at the end."""
        for pair in self.iter_with_mids():
            return pair
        raise StopIteration

    def filter(self, predicate: Callable[[Any], bool] | type) -> None:
        """Only items satisfying ``predicate`` (or instances of a type) are returned; others pass."""
        if isinstance(predicate, type):
            kind = predicate
            self.filters.append(lambda item: isinstance(item, kind))
        else:
            self.filters.append(predicate)

    def send(self, item: Any) -> None:
        """Send ``item`` downstream; raises TypeError for types Gadgetron cannot receive."""
        import ismrmrd

        message_id(item)  # type check
        if isinstance(item, ismrmrd.Image):
            item = ismrmrd.Image.from_bytes(item.to_bytes())
        self._sink(item)


def message_id(item: Any) -> int:
    """The wire message id of ``item`` (``gadgetron.external.constants``); TypeError for anything else."""
    import ismrmrd
    from gadgetron.external import constants
    from gadgetron.types import AcquisitionBucket, ImageArray, ReconData

    for kind, mid in (
        (ismrmrd.Acquisition, constants.GADGET_MESSAGE_ISMRMRD_ACQUISITION),
        (ismrmrd.Image, constants.GADGET_MESSAGE_ISMRMRD_IMAGE),
        (ReconData, constants.GADGET_MESSAGE_RECON_DATA),
        (ImageArray, constants.GADGET_MESSAGE_IMAGE_ARRAY),
        (ismrmrd.Waveform, constants.GADGET_MESSAGE_ISMRMRD_WAVEFORM),
        (AcquisitionBucket, constants.GADGET_MESSAGE_BUCKET),
    ):
        if isinstance(item, kind):
            return mid
    raise TypeError(f"No appropriate writer found for item of type '{type(item)}'")


def load_target(node: Node) -> Callable[[Any], None]:
    """The Python callable an ``<external>`` node runs (``<connect>``: semrecon's server target)."""
    import inspect

    module_name, target_name = (node.module, node.target) if node.module else CONNECT_TARGET
    module_name = BUILTIN_MODULES.get(module_name, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChainError(f"<execute name=\"{node.module}\">: cannot import module '{module_name}' ({exc})") from None
    target = getattr(module, target_name or "", None)
    if inspect.isclass(target):
        handler: Any = target
        return lambda connection: handler().handle(connection)
    if not callable(target):
        raise ChainError(f"<execute target=\"{target_name}\">: module '{module_name}' has no callable '{target_name}'")
    return target


def build_stages(
    chain: Chain,
    header_xml: str,
    *,
    overrides: dict[str, str] | None = None,
    external: Callable[[Node, str], Stage] | None = None,
) -> list[Stage]:
    """One stage per node of ``chain``.

    ``external(node, configuration)`` builds the stage of ``<external>`` nodes (default: run the target
    in-process); ``overrides`` are merged into their configuration.
    """
    import ismrmrd

    header = ismrmrd.xsd.CreateFromDocument(header_xml)
    stages: list[Stage] = []
    for node in chain.nodes:
        if node.kind == "external":
            configuration = merge_configuration(node.configuration, overrides or {})
            make = external or _in_process_stage(header_xml)
            stages.append(make(node, configuration))
        else:
            stages.append(_gadget_stage(node, header, chain.source))
    return stages


def run_chain(
    chain: Chain,
    header_xml: str,
    items: Iterable[Any],
    *,
    overrides: dict[str, str] | None = None,
    external: Callable[[Node, str], Stage] | None = None,
) -> Iterator[Any]:
    """Push ``items`` (acquisitions, waveforms) through the chain; yields what leaves its end."""
    stream: Iterator[Any] = iter(items)
    for stage in build_stages(chain, header_xml, overrides=overrides, external=external):
        stream = stage(stream)
    return stream


# -- image gadgets -------------------------------------------------------------------------------


def autoscale(image: Any, *, max_value: float = 2048.0, histogram_bins: int = 100) -> Any:
    """AutoScaleGadget: scale a magnitude image so that its 99th-percentile histogram bin maps to ``max_value``.

    The histogram has ``histogram_bins`` bins between 0 and the maximum; other image types pass unchanged.
    """
    import ismrmrd

    if image.image_type != ismrmrd.IMTYPE_MAGNITUDE:
        return image
    from semrecon_core.data.images import autoscale_factor

    data = image.data
    factor = autoscale_factor(data, max_value=max_value, histogram_bins=histogram_bins)
    if factor is None:
        peak = float(data.max()) if data.size else 0.0
        log.warning("AutoScaleGadget: image %d has maximum %s; left unscaled", image.image_index, peak)
        return image
    data *= np.float32(factor)
    return image


def float_to_ushort(
    image: Any, *, max_intensity: float = 4095, min_intensity: float = 0, intensity_offset: float = 2048
) -> Any:
    """FloatToUShortGadget: float images to unsigned 16-bit, rounded.

    Magnitude → clamp(|v|); real/imag → clamp(v) (window centre + offset); phase → clamp(v·offset/π + offset).
    """
    import ismrmrd

    if image.data.dtype != np.float32:
        raise ChainError(
            f"FloatToUShortGadget: expected float images, found {image.data.dtype} (image {image.image_index})"
        )
    data = image.data.astype(np.float64)
    kind = image.image_type
    meta = ismrmrd.Meta(dict(image.meta))
    if kind == ismrmrd.IMTYPE_MAGNITUDE:
        data = np.abs(data)
    elif kind in (ismrmrd.IMTYPE_REAL, ismrmrd.IMTYPE_IMAG):
        if "GADGETRON_WindowCenter" in meta:
            meta["GADGETRON_WindowCenter"] = str(int(float(meta["GADGETRON_WindowCenter"])) + int(intensity_offset))
    elif kind == ismrmrd.IMTYPE_PHASE:
        data = data * intensity_offset / math.pi + intensity_offset
    else:
        raise ChainError(f"FloatToUShortGadget: unknown image type {kind} (image {image.image_index})")
    values = np.rint(np.clip(data, min_intensity, max_intensity)).astype(np.uint16)
    head = image.getHead()
    head.data_type = ismrmrd.DATATYPE_USHORT
    out = ismrmrd.Image(head=head, meta=meta)
    out.data[:] = values
    return out


# -- internals -----------------------------------------------------------------------------------


def _read_source(source: str | Path) -> tuple[str, str]:
    if isinstance(source, Path) or not str(source).lstrip().startswith("<"):
        path = Path(source)
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ChainError(f"{path}: cannot read the chain ({exc.strerror or exc})") from None
    return str(source), "chain XML"


def _strip_namespaces(root: ET.Element) -> ET.Element:
    for element in root.iter():
        if isinstance(element.tag, str) and "}" in element.tag:
            element.tag = element.tag.split("}", 1)[1]
    return root


def _remove(root: ET.Element, target: ET.Element) -> None:
    for parent in root.iter():
        if target in list(parent):
            parent.remove(target)
            return


def _classname(element: ET.Element, where: str) -> str:
    name = (element.findtext("classname") or "").strip()
    if not name:
        raise ChainError(f"{where}: <{element.tag}> without <classname>")
    return name


def _parse_node(element: ET.Element, where: str) -> Node:
    if element.tag == "gadget":
        classname = _classname(element, where)
        name = (element.findtext("name") or classname).strip()
        if classname not in GADGETS:
            raise ChainError(f"{where}: unknown gadget '{classname}' (semrecon replay runs: {', '.join(GADGETS)})")
        known = GADGETS[classname]
        properties: dict[str, str] = {}
        for child in element:
            if child.tag in ("name", "dll", "classname"):
                continue
            if child.tag != "property":
                raise ChainError(f"{where}: gadget '{name}': unknown element <{child.tag}>")
            prop = child.get("name") or (child.findtext("name") or "").strip()
            value = child.get("value") if child.get("name") else child.findtext("value")
            if prop not in known:
                raise ChainError(
                    f"{where}: gadget '{name}' ({classname}): unknown property '{prop}' "
                    f"(known: {', '.join(known) or 'none'})"
                )
            properties[prop] = (value or "").strip()
        return Node(kind="gadget", classname=classname, name=name, properties=properties)
    if element.tag == "external":
        execute, connect = element.find("execute"), element.find("connect")
        configuration = element.find("configuration")
        for child in element:
            if child.tag not in ("execute", "connect", "configuration"):
                raise ChainError(f"{where}: <external>: unknown element <{child.tag}>")
        text = ET.tostring(configuration, encoding="unicode") if configuration is not None else "<configuration/>"
        if (execute is None) == (connect is None):
            raise ChainError(f"{where}: <external> needs exactly one of <execute> or <connect>")
        from semrecon_core.gadgetron.properties import parse_properties

        properties = parse_properties(text, source=f"{where}: <external> configuration")
        if execute is not None:
            kind = execute.get("type", "python")
            if kind != "python":
                raise ChainError(f'{where}: <execute type="{kind}">: only type="python" can run here')
            module, target = execute.get("name"), execute.get("target")
            if not module or not target:
                raise ChainError(f'{where}: <execute> needs name="MODULE" and target="FUNCTION"')
            return Node(
                kind="external",
                classname="external",
                name=module,
                properties=properties,
                module=module,
                target=target,
                configuration=text,
            )
        assert connect is not None  # exactly one of <execute> and <connect>, checked above
        port = connect.get("port")
        try:
            port_number = int(port or "")
        except ValueError:
            raise ChainError(f'{where}: <connect port="{port}">: expected a port number') from None
        return Node(
            kind="external",
            classname="external",
            name="connect",
            properties=properties,
            address=connect.get("address", "localhost"),
            port=port_number,
            configuration=text,
        )
    raise ChainError(f"{where}: unknown element <{element.tag}> in <stream>")


def _in_process_stage(header_xml: str) -> Callable[[Node, str], Stage]:
    def make(node: Node, configuration: str) -> Stage:
        target = load_target(node)

        def stage(items: Iterator[Any]) -> Iterator[Any]:
            sent: list[Any] = []
            connection = InProcessConnection(items, header_xml, configuration, sent.append)
            target(connection)
            for _ in connection:  # Gadgetron drains what the target left unread
                pass
            yield from sent

        return stage

    return make


def _bool(node: Node, name: str, where: str) -> bool:
    value = node.properties.get(name, GADGETS[node.classname][name]).lower()
    if value not in ("true", "false", "1", "0"):
        raise ChainError(f"{where}: gadget '{node.name}': property '{name}': expected true or false, found {value!r}")
    return value in ("true", "1")


def _number(node: Node, name: str, where: str) -> float:
    value = node.properties.get(name, GADGETS[node.classname][name])
    try:
        return float(value)
    except ValueError:
        raise ChainError(
            f"{where}: gadget '{node.name}': property '{name}': expected a number, found {value!r}"
        ) from None


def _image_stage(function: Callable[[Any], Any]) -> Stage:
    import ismrmrd

    def stage(items: Iterator[Any]) -> Iterator[Any]:
        for item in items:
            yield function(item) if isinstance(item, ismrmrd.Image) else item

    return stage


def _gadget_stage(node: Node, header: Any, where: str) -> Stage:
    name = node.classname
    if name == "AutoScaleGadget":
        max_value = _number(node, "max_value", where)
        bins = int(_number(node, "histogram_bins", where))
        if bins < 1:
            raise ChainError(f"{where}: gadget '{node.name}': property 'histogram_bins': expected >= 1, found {bins}")
        return _image_stage(lambda image: autoscale(image, max_value=max_value, histogram_bins=bins))
    if name == "FloatToUShortGadget":
        limits = {key: _number(node, key, where) for key in ("max_intensity", "min_intensity", "intensity_offset")}
        return _image_stage(lambda image: float_to_ushort(image, **limits))
    if name == "ImageFinishGadget":
        return lambda items: items
    return _buffer_stage(node, header, where)


def _buffer_stage(node: Node, header: Any, where: str) -> Stage:
    """The acquisition-side gadgets, from :mod:`semrecon_core.data.buffers`."""
    from semrecon_core.data import buffers

    name = node.classname
    if name == "NoiseAdjustGadget":
        return lambda items: buffers.noise_adjust(items, header)
    if name == "AsymmetricEchoAdjustROGadget":
        return lambda items: buffers.asymmetric_echo_adjust(items, header)
    if name == "RemoveROOversamplingGadget":
        return lambda items: buffers.remove_ro_oversampling(items, header)
    if name == "AcquisitionAccumulateTriggerGadget":
        trigger = node.properties.get("trigger_dimension", "").strip() or "none"
        if trigger not in ("none", *TRIGGER_DIMENSIONS):
            raise ChainError(
                f"{where}: gadget '{node.name}': property 'trigger_dimension': expected one of "
                f"{', '.join(TRIGGER_DIMENSIONS)} (or empty), found {trigger!r}"
            )
        if node.properties.get("sorting_dimension", "").strip():
            raise ChainError(
                f"{where}: gadget '{node.name}': property 'sorting_dimension' is not supported offline (leave it empty)"
            )
        return lambda items: buffers.accumulate_trigger(items, trigger)
    # BucketToBufferGadget
    dims = {}
    for prop in ("N_dimension", "S_dimension"):
        value = node.properties.get(prop, "").strip()
        if value and value not in TRIGGER_DIMENSIONS:
            raise ChainError(
                f"{where}: gadget '{node.name}': property '{prop}': expected one of "
                f"{', '.join(TRIGGER_DIMENSIONS)} (or empty), found {value!r}"
            )
        dims[prop] = value
    split_slices = _bool(node, "split_slices", where)
    _bool(node, "verbose", where)

    def stage(items: Iterator[Any]) -> Iterator[Any]:
        for bucket in items:
            if isinstance(bucket, buffers.Bucket):
                if bucket.data:
                    yield buffers.bucket_to_buffer(
                        bucket,
                        header,
                        n_dimension=dims["N_dimension"],
                        s_dimension=dims["S_dimension"],
                        split_slices=split_slices,
                    )
            else:
                yield bucket

    return stage
