"""The ``semrecon`` command line: fast help without heavy imports, clear errors."""

from __future__ import annotations

import subprocess
import sys

from semrecon_core.commands import main as cli


def test_help_lists_every_subcommand(capsys) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from semrecon_core.commands import main as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'sigpy', 'peft', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: semrecon" in out
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_every_subcommand_module_provides_the_cli_hooks() -> None:
    import importlib

    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, "add_arguments", None)), f"{name}: {module_name}.add_arguments missing"
        assert callable(getattr(module, "run", None)), f"{name}: {module_name}.run missing"


def test_unknown_subcommand_is_an_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "semrecon_core.commands.main", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr
