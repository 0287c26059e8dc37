"""Backbones with TV at the preset defaults on a real knee slice: ≥ 3 dB over zero-filled, ≤ 1.5 dB below CS-TV.

The case of ``benchmarks/bench_backbones.py --defaults``: fastMRI knee PD ``pd_00`` resampled to 128², 15 simulated
coils, R = 4, 24 ACS lines, ESPIRiT maps; λ, learning rate, iterations and final data consistency are the presets'
defaults, the networks are the benchmark's CPU sizes. Measured (``benchmarks/results/backbones_defaults.md`` and the
diagnostic runs named there): zero-filled 32.35 dB, CS-TV 36.08 dB; public-code U-Net 35.77 dB, paper U-Net 35.86 dB.
The rows that do not reach the criteria yet (public-code unrolled) are not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee_fastmri_rss"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def knee():
    """``(k-space, maps, zero-filled PSNR, CS-TV PSNR)`` of the benchmark's knee case."""
    if not (DATA / "pd_00.npy").is_file():
        pytest.skip(f"needs the shared knee data at {DATA} (not part of the repository)")
    from skimage.transform import resize

    from semrecon_core import metrics
    from semrecon_core.config import ReconConfig
    from semrecon_core.data.simulate import simulate_kspace
    from semrecon_core.pipeline import Pipeline, reconstruct

    image = resize(np.load(DATA / "pd_00.npy"), (128, 128), anti_aliasing=True).astype(np.float32)
    kspace = simulate_kspace(image, coils=15, acceleration=4, acs_width=24, mask_kind="gaussian", seed=0)
    maps = Pipeline(ReconConfig(device="cpu")).estimate_maps(kspace)
    truth = kspace.ground_truth
    zero_filled = reconstruct(kspace, ReconConfig(backbone="zero-filled", device="cpu"), maps=maps).image
    cs_tv = reconstruct(kspace, ReconConfig(backbone="sense", prior="tv", device="cpu"), maps=maps).image
    return kspace, maps, metrics.psnr(truth, zero_filled), metrics.psnr(truth, cs_tv)


@pytest.mark.parametrize("preset", ["public-code", "paper"])
def test_unet_with_tv_at_the_default_settings(knee, preset: str) -> None:
    from semrecon_core import metrics
    from semrecon_core.config import ReconConfig
    from semrecon_core.pipeline import reconstruct

    kspace, maps, zero_filled, cs_tv = knee
    config = ReconConfig(backbone="unet", prior="tv", preset=preset, width=16, depth=4, device="cpu")
    value = metrics.psnr(kspace.ground_truth, reconstruct(kspace, config, maps=maps).image)
    assert value - zero_filled >= 3.0, f"{preset} U-Net + TV: {value:.2f} dB, zero-filled {zero_filled:.2f} dB"
    assert cs_tv - value <= 1.5, f"{preset} U-Net + TV: {value:.2f} dB, CS-TV {cs_tv:.2f} dB"
