"""``semrecon serve``: serve Gadgetron ``<connect>`` chains, or MRD clients (``--mrd``), with the model kept loaded.

With ``--mrd`` the server is an MRD App (:mod:`semrecon_core.mrd.server`, port 9002 by default): clients stream raw
acquisitions and name a chain by its stem (CONFIG_FILE: ``semrecon_cgsense``, ``semrecon_tv``,
``semrecon_semantic``, or one in ``--chains DIR``) and settings as JSON (CONFIG_TEXT); ``--config`` is then the
chain of scans that name none. Everything below holds for both protocols (errors go to MRD clients as TEXT).

Runs a :class:`~semrecon_core.gadgetron.serve.GadgetServer` on 127.0.0.1 (by default) until SIGINT /
SIGTERM or ``--max-scans``. Each connection is served in its own thread (at most ``--max-connections``
at once), reconstructions one at a time. A signal stops the server gracefully: new scans are refused with an
ERROR, connections whose CONFIG and HEADER have not arrived are closed with an ERROR, and the scans in progress
get ``--grace-s`` seconds (default 8, inside Docker's 10 s stop timeout) to finish and send their images; scans
still running then are closed with an ERROR, and the server exits with status 0. A second signal stops it at once
(status 130). Base settings this machine cannot satisfy (``--set device=cuda`` without CUDA) exit 2 before
listening. The base properties come from
the ``<external>`` node of ``--config CHAIN.xml`` (whose ``<connect port>`` is also the default port);
``--set name=value`` wins over every scan's CONFIG.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from semrecon_core.gadgetron.serve import DEFAULT_GRACE_S, LOOPBACK

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``semrecon serve`` options."""
    parser.add_argument(
        "--mrd",
        action="store_true",
        help="serve the MRD streaming protocol (an MRD App: raw acquisitions in, images out; default port 9002) "
        "instead of Gadgetron <connect> chains",
    )
    parser.add_argument(
        "--chains",
        type=Path,
        metavar="DIR",
        help="--mrd: further chains a client's CONFIG_FILE may name by file stem (besides the shipped ones)",
    )
    parser.add_argument(
        "--dicom",
        type=Path,
        metavar="DIR",
        help="--mrd: also write each finished scan's images as DICOM series into DIR/<date>-<time>-scan<N>/",
    )
    parser.add_argument(
        "--port",
        type=int,
        help="TCP port (default: the <connect port> of --config; 9002 with --mrd; 0: any free)",
    )
    parser.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="CHAIN.xml",
        help="chain whose <external> <configuration> gives the base properties (--mrd: the chain of a scan "
        "whose client names none; default semrecon_cgsense)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="property that wins over the scan's configuration (repeatable)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="drop a scan when Gadgetron is silent this long (default 3600 s; 30 s at most for CONFIG and HEADER)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=8,
        metavar="N",
        help="scans served at once; one more is refused with an ERROR (default 8; reconstructions run one at a time)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="S",
        help=f"after SIGINT/SIGTERM, seconds the scans in progress get to finish and send their images (default "
        f"{DEFAULT_GRACE_S:g}, inside Docker's 10 s stop timeout); a second signal stops at once",
    )
    parser.add_argument(
        "--max-scans",
        type=int,
        default=0,
        metavar="N",
        help="exit after N scans (default 0: run until SIGINT/SIGTERM)",
    )


def _chain_properties(path: Path) -> tuple[dict[str, str], int | None]:
    """The ``<external>`` node's properties and ``<connect port>`` of the chain ``path``."""
    from semrecon_core.emulation.chain import parse_chain

    node = parse_chain(path).external
    if node is None:
        raise ValueError(f"{path}: the chain has no <external> node")
    return dict(node.properties), node.port


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (or ``--max-scans``)."""
    from semrecon_core.gadgetron.properties import parse_assignments
    from semrecon_core.gadgetron.serve import GadgetServer

    properties: dict[str, str] = {}
    port = args.port
    if args.mrd:
        from semrecon_core.mrd.server import DEFAULT_CHAIN, DEFAULT_PORT

        port = DEFAULT_PORT if port is None else port
    elif args.chains is not None or args.dicom is not None:
        option = "--chains" if args.chains is not None else "--dicom"
        raise ValueError(f"{option}: only with --mrd (Gadgetron writes its own outputs)")
    if args.config is not None and not args.mrd:
        properties, chain_port = _chain_properties(args.config)
        port = chain_port if port is None else port
    if port is None:
        raise ValueError("--port: give a port (or a --config chain with <connect port=...>)")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port: expected 0..65535, found {port}")
    if args.idle_timeout <= 0:
        raise ValueError(f"--idle-timeout: expected a positive number of seconds, found {args.idle_timeout}")
    if not args.grace_s >= 0:
        raise ValueError(f"--grace-s: expected seconds >= 0, found {args.grace_s}")
    if args.max_connections < 1:
        raise ValueError(f"--max-connections: expected at least 1, found {args.max_connections}")
    if args.host not in (LOOPBACK, "localhost", "::1"):
        log.warning("semrecon serve: listening on %s exposes the reconstruction server beyond this machine", args.host)
    server: GadgetServer
    if args.mrd:
        from semrecon_core.mrd.server import MRDServer

        server = MRDServer(
            args.host,
            port,
            chains=args.chains,
            default_chain=str(args.config) if args.config is not None else DEFAULT_CHAIN,
            overrides=parse_assignments(args.set),
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
            dicom=args.dicom,
        )
    else:
        server = GadgetServer(
            args.host,
            port,
            properties=properties,
            overrides=parse_assignments(args.set),
            idle_timeout=args.idle_timeout,
            max_connections=args.max_connections,
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            # At once: no interpreter shutdown, which would wait on (or abort inside) a running reconstruction.
            sys.stderr.write(f"semrecon serve: second {signal.Signals(signum).name}: stopping at once\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        log.warning(
            "semrecon serve: %s received; refusing new scans, letting the scans in progress finish within %g s "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
            args.grace_s,
        )
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.preload()
        host, bound = server.address
        print(f"semrecon serve: listening on {host}:{bound}", flush=True)
        served = server.serve_forever(stop, max_scans=args.max_scans, grace_s=args.grace_s)
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"semrecon serve: stopped after {served} scan(s)", flush=True)
    return 0
