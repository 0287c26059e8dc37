"""CMake installs the gadget modules and chains where Gadgetron looks for them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str:
    path = shutil.which("cmake")
    if path is None:
        pytest.skip("'cmake' is not on PATH (install the Debian package cmake)")
    return path


def _install(tmp_path: Path, *configure_args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmake = _cmake()
    build = tmp_path / "build"
    configured = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), *configure_args], capture_output=True, text=True, env=env
    )
    assert configured.returncode == 0, configured.stderr
    installed = subprocess.run([cmake, "--install", str(build)], capture_output=True, text=True, env=env)
    assert installed.returncode == 0, installed.stderr
    return configured


def test_install_into_a_prefix_puts_files_where_gadgetron_looks(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    _install(tmp_path, f"-DCMAKE_INSTALL_PREFIX={prefix}")
    python_dir = prefix / "share" / "gadgetron" / "python"
    config_dir = prefix / "share" / "gadgetron" / "config"
    assert sorted(p.name for p in python_dir.iterdir()) == sorted(p.name for p in (ROOT / "gadgets").glob("*.py"))
    assert sorted(p.name for p in config_dir.iterdir()) == sorted(p.name for p in (ROOT / "config").glob("*.xml"))
    for name in ("semrecon_semantic.xml", "semrecon_tv.xml", "semrecon_cgsense.xml", "semrecon_connect.xml"):
        assert (config_dir / name).read_bytes() == (ROOT / "config" / name).read_bytes()
    # What Gadgetron does for <execute name="semrecon_gadget" target="reconstruct">: import the module
    # with share/gadgetron/python on PYTHONPATH.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(python_dir)])))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import semrecon_gadget, inspect; print(inspect.getfile(semrecon_gadget)); "
                "print(callable(semrecon_gadget.reconstruct))"
            ),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(python_dir / "semrecon_gadget.py"), "True"]


def test_default_prefix_is_the_gadgetron_home(tmp_path: Path) -> None:
    home = tmp_path / "gadgetron"
    home.mkdir()
    env = dict(os.environ, GADGETRON_HOME=str(home))
    configured = _install(tmp_path, env=env)
    assert str(home) in configured.stdout
    assert (home / "share" / "gadgetron" / "python" / "semrecon_gadget.py").is_file()
    assert (home / "share" / "gadgetron" / "config" / "semrecon_semantic.xml").is_file()


def test_default_prefix_follows_the_gadgetron_executable(tmp_path: Path) -> None:
    prefix = tmp_path / "conda_env"
    (prefix / "bin").mkdir(parents=True)
    executable = prefix / "bin" / "gadgetron"
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "GADGETRON_HOME"}
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _install(tmp_path, env=env)
    assert (prefix / "share" / "gadgetron" / "python" / "semrecon_gadget.py").is_file()


def test_dockerfile_derives_from_gadgetron_and_copies_existing_paths() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM ghcr.io/gadgetron/gadgetron/gadgetron_ubuntu_rt_cuda:latest" in text
    assert "/opt/conda/envs/gadgetron" in text and "HF_HUB_OFFLINE=1" in text and "VOLUME" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the repository lacks"


def test_the_docker_image_has_a_volume_for_every_path_the_semantic_chain_reads() -> None:
    import re

    from semrecon_core.emulation.chain import parse_chain

    text = (ROOT / "docker" / "Dockerfile").read_text()
    volumes = re.search(r"^VOLUME \[(.*)\]$", text, re.MULTILINE)
    assert volumes is not None
    mounted = {v.strip().strip('"') for v in volumes.group(1).split(",")}
    node = next(n for n in parse_chain(ROOT / "config" / "semrecon_semantic.xml").nodes if n.kind == "external")
    for name in ("bank", "checkpoint"):
        assert str(Path(node.properties[name]).parent) in mounted, name
    assert "[semantic,gpu]" in text  # CuPy: sigpy's ESPIRiT on the GPU
