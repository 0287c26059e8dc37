"""The ``semrecon`` command line: the table of subcommands and the entry point.

Every subcommand is a module in :mod:`semrecon_core.commands` providing ``add_arguments(parser)`` and
``run(args) -> int``; this file only knows their names and one-line help and imports a subcommand's
module when it runs, so ``semrecon --help`` imports nothing heavy. Errors that name a problem (bad input
file, bad property) are printed as ``semrecon <command>: error: ...`` with exit status 2; ``--debug``
shows tracebacks. A command whose standard output is a pipe that its reader closed (``semrecon recon IN OUT
| head``) ends quietly with status 141, as a command-line tool killed by SIGPIPE does (128 + 13), after the
outputs it had committed; SIGPIPE itself stays ignored, so a closed socket (``semrecon serve``) is an error
the server handles, not the end of the process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys

# name -> (module providing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("semrecon_core.commands.simulate", "write a simulated multicoil ISMRMRD raw file (with ground truth)"),
    "recon": ("semrecon_core.commands.recon", "reconstruct a raw file (ISMRMRD, fastMRI .h5, .npy, .cfl)"),
    "demo": ("semrecon_core.commands.demo", "CG-SENSE, TV and the semantic prior side by side on a built-in scan"),
    "pretrain": ("semrecon_core.commands.pretrain", "warm-start a U-Net / unrolled network on auxiliary images"),
    "bank": ("semrecon_core.commands.bank", "build or inspect an embedding bank for the semantic prior"),
    "encoder": ("semrecon_core.commands.encoder", "install a real encoder or make a tiny random Janus"),
    "replay": ("semrecon_core.commands.replay", "run a Gadgetron chain offline on an ISMRMRD file"),
    "serve": ("semrecon_core.commands.serve", "serve <connect> Gadgetron chains with the model kept loaded"),
    "study": ("semrecon_core.commands.study", "the paper's Table-1 study over a set of cases (resumable, Ray)"),
    "readers": ("semrecon_core.commands.readers", "blinded reader study in the browser: export, serve, analyze"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semrecon",
        description="Vision-language semantic priors for MRI reconstruction (offline and as a Gadgetron gadget).",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from semrecon_core import __version__

    return f"semrecon {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``semrecon`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    options, rest = top.parse_known_args(argv)
    if options.command is None:
        top.print_help()
        return 0 if not rest else 2
    module_name, help_text = COMMANDS[options.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"semrecon {options.command}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        try:
            return int(module.run(args) or 0)
        except BrokenPipeError:
            if options.debug or not _stdout_reader_gone():
                raise  # another pipe (a child process, a socket): an error like any other
            _discard_stdout()
            return SIGPIPE_STATUS
    except KeyboardInterrupt:
        print("semrecon: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as exc:
        if options.debug:
            raise
        print(f"semrecon {options.command}: error: {exc}", file=sys.stderr)
        return 2


#: the status of a command whose standard output lost its reader: 128 + SIGPIPE, as shells report it
SIGPIPE_STATUS = 141


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or no file descriptor behind stdout
        return False


def _discard_stdout() -> None:
    """Point standard output at the null device, so the interpreter's last flush does not fail again."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)


if __name__ == "__main__":
    sys.exit(main())
