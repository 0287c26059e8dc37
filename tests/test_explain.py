"""Settings that explain themselves: one resolution with sources, ``recon --explain``, λ in the outputs.

Precedence explicit > bank (``recommended`` in its metadata) > preset table > default; the bank's metadata are
read once per resolution and the prior reuses them; the shipped chains' comments state the resolved defaults.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from semrecon_core.commands.main import main
from semrecon_core.config import BACKBONES, PRIORS, RECOMMENDABLE, ConfigError, ReconConfig
from semrecon_core.settings import explain, resolve

CONFIG = Path(__file__).resolve().parents[1] / "config"
PAIRS = [
    (backbone, prior)
    for backbone in BACKBONES
    for prior in PRIORS
    if not (prior == "semantic" and backbone in ("zero-filled", "sense"))
]


def _bank_with(bank: Path, target: Path, recommended: dict | None) -> Path:
    """A copy of ``bank`` whose metadata carry ``recommended``."""
    from semrecon_core.priors.bank import load_bank

    copy = load_bank(bank)
    if recommended is not None:
        copy.metadata["recommended"] = recommended
    return copy.save(target)


def _cells(table: str, name: str) -> list[str]:
    """The cells (setting, value, source[, note]) of setting ``name`` in an explain table."""
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == name:
            return cells
    raise AssertionError(f"{name} not in\n{table}")


def _row(table: str, name: str) -> tuple[str, str]:
    """``(value, source)`` of setting ``name`` in an explain table."""
    cells = _cells(table, name)
    return cells[1], cells[2]


@pytest.mark.parametrize(("backbone", "prior"), PAIRS)
def test_recon_explain_lists_lam_and_its_source_for_every_pair(
    backbone: str, prior: str, tiny_janus_bank: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    encoder, bank = tiny_janus_bank
    options = ["--backbone", backbone, "--prior", prior]
    if prior == "semantic":
        options += ["--bank", str(bank), "--encoder", str(encoder)]
    assert main(["recon", "--explain", *options]) == 0  # no IN, no OUT: prints only
    table = capsys.readouterr().out
    expected = resolve(ReconConfig(backbone=backbone, prior=prior))  # type: ignore[arg-type]
    value, source = _row(table, "lam (λ)")
    assert float(value) == expected.lam
    assert source == expected.source("lam")
    assert (_cells(table, "lam (λ)")[3:] == ["(unused)"]) == (backbone == "zero-filled")
    if backbone == "zero-filled":
        assert source == "classical default (CG-SENSE)" if prior == "none" else "classical default (CS-TV)"
    elif backbone == "sense":
        assert source == f"classical default ({'CS-TV' if prior == 'tv' else 'CG-SENSE'})"
    elif prior == "none":
        assert source == "preset table (no prior; every preset)" and value == "0"
    else:
        assert source.startswith("preset paper (") and source.endswith(f"{prior.replace('tv', 'TV')})")
    if prior == "semantic":
        assert "image-only bank" in table.splitlines()[0]
    for name in ("backbone", "prior", "iterations", "seed"):
        _row(table, name)  # every field is listed
    assert _row(table, "backbone") == (backbone, "default" if backbone == "sense" else "explicit")


def test_sources_follow_the_precedence_explicit_bank_preset(tiny_janus_bank: tuple[Path, Path], tmp_path: Path) -> None:
    encoder, bank = tiny_janus_bank
    recommended = {"lam": {"paper/unet": 0.002, "inr": 0.03}, "iterations": 700}
    path = _bank_with(bank, tmp_path / "calibrated.safetensors", recommended)
    base = ReconConfig(backbone="unet", prior="semantic", bank=str(path), encoder=str(encoder))
    config = resolve(base)
    assert (config.lam, config.source("lam")) == (0.002, f"bank {path}")
    assert (config.iterations, config.source("iterations")) == (700, f"bank {path}")
    assert config.source("lr") == "preset table (every preset)" and config.source("seed") == "default"
    explicit = resolve(base.replace(lam=0.5))
    assert (explicit.lam, explicit.source("lam")) == (0.5, "explicit")
    unrolled = resolve(base.replace(backbone="unrolled"))  # no selector matches: the preset table's
    assert (unrolled.lam, unrolled.source("lam")) == (0.0018, "preset paper (unrolled + semantic)")
    assert resolve(base.replace(backbone="inr")).lam == 0.03
    assert _row(explain(base), "lam (λ)") == ("0.002", f"bank {path}")
    # properties (study keys, traces) stay the fields; a changed resolved value becomes explicit
    assert "sources" not in config.to_properties() and "bank_metadata" not in config.to_properties()
    assert config.replace(lam=0.1).source("lam") == "explicit"
    assert config.replace(bank="other").bank_metadata is None
    bad = _bank_with(bank, tmp_path / "bad.safetensors", {"tau": 0.1})
    with pytest.raises(ConfigError, match="may recommend"):
        resolve(base.replace(bank=str(bad)))


def test_bank_metadata_are_read_once_per_resolution_and_reused_by_the_prior(
    tiny_janus_bank: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from semrecon_core.pipeline import Pipeline
    from semrecon_core.priors import bank as bank_module
    from semrecon_core.priors.factory import clear_cache

    encoder, bank = tiny_janus_bank
    reads: list[str] = []
    original = bank_module.read_metadata

    def counting(path: str) -> dict:
        reads.append(str(path))
        return original(path)

    monkeypatch.setattr(bank_module, "read_metadata", counting)
    clear_cache()
    config = ReconConfig(backbone="unet", prior="semantic", bank=str(bank), encoder=str(encoder), device="cpu")
    pipeline = Pipeline(config)
    assert len(reads) == 1 and pipeline.config.bank_kind == "image"
    assert pipeline.prior is not None
    assert len(reads) == 1, reads  # building the prior (encoder, bank tensors) used the metadata already read
    clear_cache()


def test_recon_explain_then_reconstructs_with_lam_in_the_image_comment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from semrecon_core.data.images import read_images
    from semrecon_core.data.simulate import write_ismrmrd_raw

    scan = write_ismrmrd_raw(tmp_path / "scan.h5", matrix=(32, 32), slices=1, coils=4, acceleration=2, acs_width=12)
    out = tmp_path / "images.h5"
    assert main(["recon", str(scan), str(out), "--prior", "tv", "--iterations", "5", "--explain"]) == 0
    printed = capsys.readouterr().out
    assert _row(printed, "lam (λ)") == ("0.003", "classical default (CS-TV)")
    assert _row(printed, "iterations") == ("5", "explicit")
    image = read_images(out)[0]
    # ISMRMRD meta are written in ASCII: λ becomes "lambda" (data.images)
    assert "; lambda 0.003 (classical default (CS-TV))" in image.meta["GADGETRON_ImageComment"]
    meta = (image.meta["SEMRECON_Lambda"], image.meta["SEMRECON_LambdaSource"])
    assert meta == ("0.003", "classical default (CS-TV)")
    zero_filled = tmp_path / "zero-filled.h5"
    assert main(["recon", str(scan), str(zero_filled), "--backbone", "zero-filled"]) == 0
    image = read_images(zero_filled)[0]  # λ has no use there: not stated
    assert "lambda" not in image.meta["GADGETRON_ImageComment"] and "SEMRECON_Lambda" not in image.meta
    assert main(["recon", str(scan)]) == 2  # OUT is needed unless only explaining


def _property_comments(path: Path) -> dict[str, tuple[str, str]]:
    """``name -> (value, comment text)`` of the external node's properties (the comment right before each)."""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))
    root = ET.parse(path, parser=parser).getroot()
    out: dict[str, tuple[str, str]] = {}
    for configuration in root.iter("configuration"):
        comment = ""
        for element in configuration:
            if element.tag is ET.Comment:
                comment = element.text or ""
            elif element.tag == "property":
                out[element.get("name", "")] = (element.get("value", ""), comment)
                comment = ""
    return out


@pytest.mark.parametrize("chain", sorted(path.name for path in CONFIG.glob("*.xml")))
def test_chain_comments_state_the_resolved_defaults(chain: str) -> None:
    """Every ``default VALUE`` a property's comment states is that property's resolved value; every property
    left empty states one."""
    from semrecon_core.emulation.chain import parse_chain
    from semrecon_core.gadgetron.properties import settings_from_configuration

    path = CONFIG / chain
    resolved = resolve(settings_from_configuration(parse_chain(path).external.configuration).config)
    properties = _property_comments(path)
    assert properties, chain
    checked = 0
    for name, (value, comment) in properties.items():
        stated = re.findall(r"\bdefault (-?[0-9][0-9.e+-]*|true|false)\b", comment)
        if value == "" and name in RECOMMENDABLE:  # the fields the preset table fills
            assert stated, f"{chain}: property {name} is empty but its comment states no `default VALUE`"
        for text in stated:
            actual = getattr(resolved, name)
            expected = actual if isinstance(actual, bool) else float(actual)
            found = text == "true" if text in ("true", "false") else float(text)
            assert found == expected, (
                f"{chain}: the comment of {name} states default {text}, the resolved value is {actual} "
                f"({resolved.source(name)})"
            )
            checked += 1
    if chain in ("semrecon_semantic.xml", "semrecon_connect.xml"):
        assert checked >= 4 and resolved.lam == 0.0016
    if chain == "semrecon_tv.xml":
        assert checked == 1
