"""Start-up hook of Gadgetron's Python gadget processes: semrecon's gadgetron-python fixes before the first read.

Gadgetron starts an ``<execute>`` node as ``python -m gadgetron PORT MODULE TARGET`` with
``$GADGETRON_HOME/share/gadgetron/python`` appended to ``PYTHONPATH``; this file is installed there
beside ``semrecon_gadget.py`` (``cmake --install``), and Python imports ``sitecustomize`` from the path at
start-up. gadgetron-python reads CONFIG and HEADER before it imports the gadget module, so fixes installed
by that module come too late for a Gadgetron that goes away (or sends a bad CONFIG / HEADER) before the
HEADER is complete: the package would spin on the closed socket. For processes started for a semrecon
gadget module (``MODULE`` starting with ``semrecon``) this hook installs the fixes of
:mod:`semrecon_core.gadgetron.compat` first; other Python gadgets of the site, and every other Python
process, are left alone. It costs nothing else, and it runs the environment's own ``sitecustomize``
(which this one shadows on the path), if there is one.
"""

import sys


def _semrecon_gadget_process() -> bool:
    """``python [options] -m gadgetron PORT semrecon... [TARGET]``."""
    argv = list(getattr(sys, "orig_argv", ()))
    for index, arg in enumerate(argv):
        if arg == "-m":
            rest = argv[index + 1 : index + 4]
            return len(rest) == 3 and rest[0] == "gadgetron" and rest[2].startswith("semrecon")
    return False


def _run_shadowed_sitecustomize() -> None:
    """Run the ``sitecustomize`` later on ``sys.path`` that this module hides, if there is one."""
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve()
    rest = [entry for entry in sys.path if Path(entry or ".").resolve() != here.parent]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or spec.origin is None or Path(spec.origin).resolve() == here:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - Python ignores a failing sitecustomize the same way
        sys.stderr.write(f"Error in sitecustomize {spec.origin}: {type(exc).__name__}: {exc}\n")


if _semrecon_gadget_process():
    try:
        from semrecon_core.gadgetron import compat
    except ImportError as exc:  # the gadget import will fail with the same cause, named
        sys.stderr.write(f"semrecon: cannot install the gadgetron-python fixes ({exc})\n")
    else:
        compat.install_for_gadget_process()
_run_shadowed_sitecustomize()
