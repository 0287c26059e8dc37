"""``semrecon serve --mrd``: semrecon as an MRD App, a server speaking the MRD streaming protocol (port 9002).

A client (a scanner's FIRE bridge, ``ismrmrd``'s own serialization, ``mrd2gadgetron``-style tools) connects,
optionally names a configuration, sends the ISMRMRD header and then **raw acquisitions** (noise scans,
oversampled readouts, calibration and imaging lines, any number of slices and repetitions), and finally CLOSE.
:class:`MRDServer` answers each connection in its own thread:

- CONFIG_FILE names a chain by its file stem: the shipped ``semrecon_cgsense``, ``semrecon_tv``,
  ``semrecon_semantic`` (``config/``) or any chain in ``--chains DIR``; its ``<external>`` properties are the
  scan's base settings (no CONFIG_FILE: the server's default chain). CONFIG_TEXT carries a JSON object of
  :class:`~semrecon_core.config.ReconConfig` fields and gadget properties (``{"iterations": 20, "preview":
  false}``), which win over the chain's; the server's ``--set`` wins over both.
- The acquisitions are assembled as they arrive by :class:`~semrecon_core.data.readers.ScanAssembler` (the path
  ``semrecon recon`` reads files with): each volume is reconstructed as soon as its last line is in, not at
  CLOSE, through :meth:`~semrecon_core.pipeline.Pipeline.stream`: the CG-SENSE preview series first (fitted
  backbones), then the final series, or the labelled fallback. The images are float magnitudes with the
  headers, geometry and meta of the Gadgetron path (:class:`~semrecon_core.gadgetron.gadget.SemreconGadget`
  numbers them), sent as IMAGE messages. Waveforms are read and dropped.
- A problem ends the scan with a TEXT ``ERROR <what and where>`` and a clean CLOSE (FIRE's convention): an
  unknown configuration name (the message names the known ones), malformed JSON, a setting that does not
  validate, a header that is missing or not ISMRMRD, acquisitions before the header, an unknown message id, a
  claimed size beyond the limits of :mod:`~semrecon_core.mrd.protocol` (checked before allocation), data the
  core refuses. A client that stays silent (``idle_timeout``) or vanishes ends only its own scan.

Everything else is the Gadgetron server's (:class:`~semrecon_core.gadgetron.serve.GadgetServer`): loopback by
default, at most ``max_connections`` scans at once, reconstructions one at a time on the device, the prior
(encoder, bank) loaded once and kept warm across connections, and the graceful stop on SIGTERM (``--grace-s``).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import semrecon_core
from semrecon_core.gadgetron.serve import LOOPBACK, GadgetServer, _Session, set_kernel_timeouts
from semrecon_core.mrd import protocol

if TYPE_CHECKING:
    from semrecon_core.gadgetron.gadget import SemreconGadget
    from semrecon_core.gadgetron.properties import GadgetSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 9002
#: the chains that ship with semrecon: ``config/`` next to the package (a checkout), else where the CMake
#: installation puts them (``<prefix>/share/gadgetron/config``)
SHIPPED_CHAINS = next(
    (
        folder
        for folder in (
            Path(semrecon_core.__file__).resolve().parent.parent / "config",
            Path(sys.prefix) / "share" / "gadgetron" / "config",
        )
        if (folder / "semrecon_cgsense.xml").is_file()
    ),
    Path(semrecon_core.__file__).resolve().parent.parent / "config",
)
DEFAULT_CHAIN = "semrecon_cgsense"


def find_chains(*directories: Path | None) -> dict[str, dict[str, str]]:
    """``{file stem: <external> properties}`` of the chains in ``directories`` (later ones win)."""
    from semrecon_core.emulation.chain import ChainError, parse_chain

    chains: dict[str, dict[str, str]] = {}
    for directory in directories:
        if directory is None:
            continue
        if not directory.is_dir():
            raise ValueError(f"--chains: {directory} is not a directory")
        for path in sorted(directory.glob("*.xml")):
            try:
                node = parse_chain(path).external
            except ChainError as exc:
                log.warning("semrecon mrd: skipping chain %s: %s", path, exc)
                continue
            if node is not None:
                chains[path.stem] = dict(node.properties)
    return chains


def json_properties(text: str, source: str = "CONFIG_TEXT") -> dict[str, str]:
    """The properties of a CONFIG_TEXT: a JSON object of settings, values as property strings.

    Numbers and strings as written, booleans ``true``/``false``, lists joined with commas (``layers``).
    An empty text is no settings. Anything else is a ``ConfigError`` naming the problem.
    """
    from semrecon_core.config import ConfigError

    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f'{source}: not JSON ({exc}); expected an object of settings, e.g. {{"iterations": 20}}'
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings, found {type(value).__name__}")

    def text_of(name: str, item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float | str):
            return str(item)
        if isinstance(item, list) and all(isinstance(v, int | float | str) for v in item):
            return ",".join(str(v) for v in item)
        if item is None:
            return ""
        raise ConfigError(f"{source}: setting '{name}': expected a number, string, boolean or list, found {item!r}")

    return {str(name): text_of(str(name), item) for name, item in value.items()}


class MRDServer(GadgetServer):
    """Accepts MRD streaming connections and reconstructs their raw acquisitions volume by volume.

    Args:
        host, port: where to listen (default loopback, :data:`DEFAULT_PORT`; 0 picks a free port).
        chains: a directory of further chains a CONFIG_FILE may name (besides :data:`SHIPPED_CHAINS`).
        default_chain: the chain of a scan that names none: a known name, or a chain file (``.xml``).
        overrides: properties that win over every scan's configuration (``--set``).
        idle_timeout, handshake_timeout, max_connections: as :class:`GadgetServer`.
        dicom: a directory where each finished scan's images also go as DICOM series
            (``DIR/<date>-<time>-scan<N>/``, :func:`~semrecon_core.data.dicom.write_dicom_series`); ``None``: none.

    The default chain's settings (with the overrides) are validated and checked against this machine here, so
    a bad ``--set`` fails before listening.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = DEFAULT_PORT,
        *,
        chains: Path | None = None,
        default_chain: str = DEFAULT_CHAIN,
        overrides: dict[str, str] | None = None,
        idle_timeout: float = 3600.0,
        handshake_timeout: float = 30.0,
        max_connections: int = 8,
        dicom: Path | None = None,
    ) -> None:
        self.dicom = dicom
        if dicom is not None:
            try:
                dicom.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"--dicom: cannot create {dicom}: {exc.strerror or exc}") from None
        self.chains = find_chains(SHIPPED_CHAINS if SHIPPED_CHAINS.is_dir() else None, chains)
        if default_chain.endswith(".xml"):  # a chain file: known by its stem from now on
            path = Path(default_chain)
            self.chains.update(find_chains(path.parent) if path.is_file() else {})
            default_chain = path.stem
        if default_chain not in self.chains:
            raise ValueError(f"default chain '{default_chain}' is not one of the known chains: {self.known}")
        self.default_chain = default_chain
        super().__init__(
            host,
            port,
            properties=self.chains[default_chain],
            overrides=overrides,
            idle_timeout=idle_timeout,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
        )

    @property
    def known(self) -> str:
        """The configuration names a CONFIG_FILE may give, comma-separated."""
        return ", ".join(sorted(self.chains)) or "none"

    @staticmethod
    def send_error(sock: socket.socket, text: str, *, linger: float = 1.0) -> bool:
        """TEXT ``ERROR <text>`` and CLOSE (FIRE's convention), then close ``sock``."""
        return protocol.send_error(sock, text, linger=linger)

    def chain_name(self, name: str) -> str:
        """The known chain a CONFIG_FILE names (a stem; a ``.xml`` suffix or directory is ignored)."""
        from semrecon_core.config import ConfigError

        stem = Path(name).name.removesuffix(".xml")
        if stem not in self.chains:
            raise ConfigError(f"CONFIG_FILE: unknown configuration '{name}'; known: {self.known}")
        return stem

    def settings_for(self, chain: str | None, text: dict[str, str], name: str) -> GadgetSettings:
        """The scan's settings: the chain's properties, then its CONFIG_TEXT, then ``--set``; float images."""
        from semrecon_core.data.images import AS_EMITTED
        from semrecon_core.gadgetron.properties import settings_from_properties

        chain = chain or self.default_chain
        properties = {**self.chains[chain], **text, **self.overrides}
        settings = settings_from_properties(properties, source=f"{name} configuration ({chain} + CONFIG_TEXT)")
        return replace(settings, display=AS_EMITTED)  # float magnitudes go out, as semrecon recon writes them

    def gadget_for(self, settings: GadgetSettings, header: Any, name: str) -> SemreconGadget:
        """The scan's gadget with the prior kept warm by this server."""
        from semrecon_core.gadgetron.gadget import SemreconGadget
        from semrecon_core.weights import DamagedWeightsError

        try:
            prior = self.prior_for(settings.config)
        except DamagedWeightsError as exc:  # the scan still gets images: each volume's labelled fallback
            log.error("semrecon mrd: %s: %s; its volumes get the labelled fallback", name, exc)
            prior = None
        return SemreconGadget(settings, header, prior=prior, device_lock=self._device_lock)

    def serve_scan(self, sock: socket.socket, *, name: str = "scan", session: _Session | None = None) -> None:
        """One MRD connection on an accepted socket; never raises (problems are logged and reported)."""
        from semrecon_core.config import ConfigError

        session = session or _Session(name, sock)
        set_kernel_timeouts(sock, self.handshake_timeout)
        start = time.perf_counter()
        scan = _Scan(self, session)
        try:
            scan.run()
        except (ConfigError, ValueError) as exc:  # refused input: the client hears why
            log.error("semrecon mrd: %s refused: %s", name, exc)
            text = str(exc)
            self._report(session, f"semrecon: {text if text.startswith(name) else f'{name}: {text}'}")
            return
        except OSError as exc:
            log.error("semrecon mrd: %s ended early: %s", name, self._reason(exc, session, scan.timeout))
            self._close(session)
            return
        except Exception as exc:  # reported to the client; the next scan is served
            log.exception("semrecon mrd: %s failed", name)
            self._report(session, f"semrecon: {name} failed: {type(exc).__name__}: {exc}")
            return
        self._close(session, protocol.close_message())
        if self.dicom is not None and scan.sent:
            self._write_dicom(scan)
        log.warning(
            "semrecon mrd: %s done: %d volume(s), %d image(s) in %.1f s",
            name,
            scan.volumes,
            scan.images,
            time.perf_counter() - start,
        )

    def _write_dicom(self, scan: _Scan) -> None:
        """The scan's images as DICOM series under :attr:`dicom` (a failure is logged; the images went out)."""
        from semrecon_core.data.dicom import write_dicom_series

        assert self.dicom is not None
        folder = self.dicom / f"{time.strftime('%Y%m%d-%H%M%S')}-{scan.name.replace(' ', '')}"
        try:
            series = write_dicom_series(folder, scan.sent, xml_header=scan.xml)
        except Exception as exc:  # noqa: BLE001 - the images have gone to the client already
            log.error(
                "semrecon mrd: %s: writing DICOM into %s failed: %s: %s", scan.name, folder, type(exc).__name__, exc
            )
            return
        log.warning("semrecon mrd: %s: %d DICOM series in %s", scan.name, len(series), folder)

    def _report(self, session: _Session, text: str) -> None:
        with session.lock:
            if session.stopped:
                return
            session.stopped = True  # nothing more goes out on this socket
        self.send_error(session.sock, text)

    @staticmethod
    def _close(session: _Session, last: bytes = b"") -> None:
        with session.lock:
            if session.stopped:  # the shutdown (or an error) has closed the session
                return
            session.stopped = True
            try:
                if last:
                    session.sock.sendall(last)
            except OSError as exc:
                log.error("semrecon mrd: %s: the client has gone before CLOSE (%s)", session.name, exc)
            finally:
                session.sock.close()


class _Scan:
    """The state of one MRD connection: configuration, header, assembler, gadget."""

    def __init__(self, server: MRDServer, session: _Session) -> None:
        self.server = server
        self.session = session
        self.name = session.name
        self.timeout = server.handshake_timeout
        self.volumes = 0
        self.images = 0
        self.xml: str | None = None
        self.sent: list[Any] = []  # the images sent, kept for DICOM output only

    def run(self) -> None:
        """Read messages until CLOSE, reconstructing and sending each volume once it is complete."""
        from semrecon_core.data.readers import ScanAssembler

        reader = protocol.MessageReader(self.session.sock)
        chain: str | None = None
        text: dict[str, str] = {}
        assembler: ScanAssembler | None = None
        gadget: SemreconGadget | None = None
        while True:
            message = reader.message_id()
            what = protocol.NAMES.get(message, str(message))
            if message in (protocol.CONFIG_FILE, protocol.CONFIG_TEXT, protocol.METADATA_XML) and assembler:
                raise protocol.ProtocolError(
                    f"{what} after the METADATA_XML header; configuration and header come once, first"
                )
            if message == protocol.CONFIG_FILE:
                chain = self.server.chain_name(reader.config_file())
            elif message == protocol.CONFIG_TEXT:
                text.update(json_properties(reader.text("CONFIG_TEXT")))
            elif message == protocol.METADATA_XML:
                xml = self.xml = reader.text("METADATA_XML", protocol.MAX_HEADER_BYTES)
                settings = self.server.settings_for(chain, text, self.name)
                try:
                    assembler = ScanAssembler(xml, source=self.name)
                except ValueError as exc:
                    raise ValueError(f"METADATA_XML: not a usable ISMRMRD header: {exc}") from None
                gadget = self.server.gadget_for(settings, assembler.header, self.name)
                with self.session.lock:
                    if self.session.stopped:  # the server stopped during the handshake and closes the socket
                        return
                    self.session.running = True
                self.timeout = self.server.idle_timeout
                set_kernel_timeouts(self.session.sock, self.timeout)
                log.warning(
                    "semrecon mrd: %s: %s, backbone=%s prior=%s",
                    self.name,
                    chain or self.server.default_chain,
                    settings.config.backbone,
                    settings.config.prior,
                )
            elif message == protocol.ACQUISITION:
                if assembler is None or gadget is None:
                    raise protocol.ProtocolError(
                        "ACQUISITION before the METADATA_XML header (the ISMRMRD header comes first)"
                    )
                for kspace in assembler.push(reader.acquisition()):
                    self._send(gadget, kspace)
            elif message == protocol.WAVEFORM:
                reader.skip_waveform()  # physiological waveforms play no part in the reconstruction
            elif message == protocol.TEXT:
                log.info("semrecon mrd: %s: the client says: %s", self.name, reader.text("TEXT"))
            elif message == protocol.CLOSE:
                if assembler is None or gadget is None:
                    raise protocol.ProtocolError(
                        "CLOSE before any METADATA_XML header and acquisitions: nothing to reconstruct"
                    )
                for kspace in assembler.finish():
                    self._send(gadget, kspace)
                if not self.volumes:
                    raise ValueError(f"no imaging acquisitions among the {assembler.acquisitions} received")
                return
            elif message == protocol.IMAGE:
                raise protocol.ProtocolError("IMAGE: this server reconstructs raw acquisitions and takes no images")
            else:
                known = ", ".join(f"{name} {number}" for number, name in protocol.NAMES.items())
                raise protocol.ProtocolError(f"unknown message id {message} (the MRD protocol has {known})")

    def _send(self, gadget: SemreconGadget, kspace: Any) -> None:
        self.volumes += 1
        volume = f"{self.name} volume {self.volumes}"
        log.warning("semrecon mrd: %s complete (%d images); reconstructing", volume, kspace.shape[0])
        for image in gadget.locked(gadget.process_kspace(kspace, name=volume)):
            message = protocol.image_message(image)
            with self.session.lock:
                if self.session.stopped:
                    raise ConnectionAbortedError(f"{self.name} was closed by the server shutdown")
                self.session.sock.sendall(message)
            self.images += 1
            if self.server.dicom is not None:
                self.sent.append(image)
