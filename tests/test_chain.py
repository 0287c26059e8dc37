"""Chain parsing (the shipped chains, unknown gadgets/properties) and the Python image gadgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ismrmrd = pytest.importorskip("ismrmrd")
pytest.importorskip("gadgetron")

from semrecon_core.config import ConfigError  # noqa: E402
from semrecon_core.emulation.chain import (  # noqa: E402
    ChainError,
    InProcessConnection,
    autoscale,
    float_to_ushort,
    merge_configuration,
    parse_chain,
    run_chain,
)
from semrecon_core.gadgetron.properties import (  # noqa: E402
    parse_properties,
    settings_from_configuration,
)

CONFIG = Path(__file__).resolve().parents[1] / "config"
STREAM = [
    "NoiseAdjustGadget",
    "AsymmetricEchoAdjustROGadget",
    "RemoveROOversamplingGadget",
    "AcquisitionAccumulateTriggerGadget",
    "BucketToBufferGadget",
    "external",
    "AutoScaleGadget",
    "FloatToUShortGadget",
    "ImageFinishGadget",
]

HEADER = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions><encoding>
<encodedSpace><matrixSize><x>8</x><y>8</y><z>1</z></matrixSize>
<fieldOfView_mm><x>100</x><y>100</y><z>5</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>8</x><y>8</y><z>1</z></matrixSize>
<fieldOfView_mm><x>100</x><y>100</y><z>5</z></fieldOfView_mm></reconSpace>
<encodingLimits/><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>"""


def _chain(stream: str) -> str:
    return f"<configuration><version>2</version><stream>{stream}</stream></configuration>"


@pytest.mark.parametrize(
    "name", ["semrecon_semantic.xml", "semrecon_tv.xml", "semrecon_cgsense.xml", "semrecon_connect.xml"]
)
def test_shipped_chains_parse_and_validate(name: str) -> None:
    chain = parse_chain(CONFIG / name)
    assert [node.classname for node in chain.nodes] == STREAM
    trigger = chain.nodes[3].properties
    assert trigger["trigger_dimension"] == "repetition"
    assert chain.nodes[4].properties["split_slices"] == "false"  # the volume in one buffer, like semrecon recon
    settings = settings_from_configuration(chain.external.configuration)
    config = settings.config
    if name in ("semrecon_semantic.xml", "semrecon_connect.xml"):
        assert (config.backbone, config.prior) == ("unet", "semantic")
        assert config.bank.endswith(".safetensors")
    elif name == "semrecon_tv.xml":
        assert (config.backbone, config.prior) == ("sense", "tv")
    else:
        assert (config.backbone, config.prior) == ("sense", "none")
    if name == "semrecon_connect.xml":
        assert chain.external.port == 18000 and chain.external.module is None
    else:
        assert (chain.external.module, chain.external.target) == ("semrecon_gadget", "reconstruct")


def test_every_gadget_property_is_documented() -> None:
    for path in CONFIG.glob("*.xml"):
        text = path.read_text()
        for name in parse_properties(parse_chain(path).external.configuration):
            assert f"<!-- {name}:" in text or f"{name}:" in text, f"{path.name}: property {name} undocumented"


def test_unknown_gadget_is_named() -> None:
    with pytest.raises(ChainError, match="unknown gadget 'GenericReconCartesianGrappaGadget'"):
        parse_chain(
            _chain(
                "<gadget><name>g</name><dll>x</dll><classname>GenericReconCartesianGrappaGadget</classname></gadget>"
            )
        )


def test_unknown_gadget_property_is_named() -> None:
    with pytest.raises(ChainError, match="unknown property 'trigger_dimensoin'"):
        parse_chain(
            _chain(
                "<gadget><name>acc</name><dll>x</dll><classname>AcquisitionAccumulateTriggerGadget"
                "</classname><property name='trigger_dimensoin' value='repetition'/></gadget>"
            )
        )


def test_unknown_elements_and_bad_values_are_errors() -> None:
    with pytest.raises(ChainError, match="unknown element <parallel>"):
        parse_chain(_chain("<parallel/>"))
    with pytest.raises(ChainError, match="exactly one of <execute> or <connect>"):
        parse_chain(_chain("<external><configuration/></external>"))
    with pytest.raises(ChainError, match="port"):
        parse_chain(_chain("<external><connect port='abc'/></external>"))
    with pytest.raises(ChainError, match="cannot read"):
        parse_chain(Path("/nonexistent/chain.xml"))
    chain = parse_chain(
        _chain(
            "<gadget><name>acc</name><dll>x</dll><classname>AcquisitionAccumulateTriggerGadget"
            "</classname><property><name>trigger_dimension</name><value>kspace</value>"
            "</property></gadget>"
        )
    )
    with pytest.raises(ChainError, match=r"'trigger_dimension'.*'kspace'"):
        list(run_chain(chain, HEADER, []))


def test_unknown_external_property_is_named() -> None:
    configuration = (
        "<configuration><property name='backbone' value='unet'/><property name='lamda' value='1'/></configuration>"
    )
    with pytest.raises(ConfigError, match="lamda"):
        settings_from_configuration(configuration)
    with pytest.raises(ConfigError, match="given twice"):
        settings_from_configuration(
            "<configuration><property name='seed' value='1'/><property name='seed' value='2'/></configuration>"
        )


def test_merge_configuration_overrides_both_spellings() -> None:
    text = (
        "<configuration><property><name>iterations</name><value>5</value></property>"
        "<property name='prior' value='tv'/></configuration>"
    )
    merged = parse_properties(merge_configuration(text, {"iterations": "7", "seed": "3"}))
    assert merged == {"prior": "tv", "iterations": "7", "seed": "3"}


def _image(data: np.ndarray, kind: int = 1) -> object:
    img = ismrmrd.Image.from_array(data.astype(np.float32), image_type=kind)
    img.meta = {"GADGETRON_WindowCenter": "10"}
    return img


def test_autoscale_maps_99th_percentile_bin_to_max_value() -> None:
    data = np.linspace(0.0, 1.0, 1000).reshape(25, 40)
    scaled = autoscale(_image(data), max_value=2048.0, histogram_bins=100)
    # 99 % of the 1000 values lie in the first 99 bins (bin 98 closes it), so the scale maps
    # (98 + 2) / 100 · max to 2048, exactly as Gadgetron's AutoScaleGadget.
    np.testing.assert_allclose(scaled.data.max(), 2048.0 / 1.00, rtol=1e-5)
    spiky = np.zeros((10, 10))
    spiky[0, 0] = 100.0
    spiky[1:, :] = 1.0
    out = autoscale(_image(spiky), max_value=1000.0, histogram_bins=100)
    # 9 zeros (bin 0) + 90 ones (bin 1) reach 99 %: Gadgetron's loop stops after bin 1 and takes
    # (counter + 1) · max / bins = 3 as the percentile value.
    assert out.data[0, 0, 5, 5] == pytest.approx(1000.0 / 3.0, rel=1e-5)
    phase = _image(np.ones((4, 4)), kind=ismrmrd.IMTYPE_PHASE)
    assert autoscale(phase).data.max() == 1.0


def test_float_to_ushort_clamps_and_keeps_header_and_meta() -> None:
    img = _image(np.array([[-5.0, 0.4, 100.6, 5000.0]]))
    img.slice, img.repetition, img.image_index = 2, 3, 7
    out = float_to_ushort(img)
    assert out.data.dtype == np.uint16 and out.data_type == ismrmrd.DATATYPE_USHORT
    assert out.data.ravel().tolist() == [5, 0, 101, 4095]
    assert (out.slice, out.repetition, out.image_index) == (2, 3, 7)
    assert out.meta["GADGETRON_WindowCenter"] == "10"
    real = float_to_ushort(_image(np.array([[-3.0, 7.2]]), kind=ismrmrd.IMTYPE_REAL))
    assert real.data.ravel().tolist() == [0, 7] and real.meta["GADGETRON_WindowCenter"] == "2058"
    phase = float_to_ushort(_image(np.array([[-np.pi, 0.0, np.pi]]), kind=ismrmrd.IMTYPE_PHASE))
    assert phase.data.ravel().tolist() == [0, 2048, 4095]


def test_in_process_connection_mimics_gadgetron() -> None:
    acq = ismrmrd.Acquisition.from_array(np.ones((2, 8), np.complex64))
    img = _image(np.ones((8, 8)))
    sent: list = []
    conn = InProcessConnection(
        [acq, img], HEADER, "<configuration><property name='a' value='b'/></configuration>", sent.append
    )
    assert conn.header.encoding[0].reconSpace.matrixSize.x == 8
    assert conn.config.find("property").get("value") == "b"
    conn.filter(ismrmrd.Image)
    received = list(conn)
    assert len(received) == 1 and isinstance(received[0], ismrmrd.Image)
    assert len(sent) == 1 and isinstance(sent[0], ismrmrd.Acquisition)  # filtered items go straight back
    conn.send(img)
    assert sent[1] is not img and sent[1].meta["GADGETRON_WindowCenter"] == "10"  # wire round trip
    with pytest.raises(TypeError, match="No appropriate writer"):
        conn.send("text")
