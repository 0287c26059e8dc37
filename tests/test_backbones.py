"""Backbone building blocks: U-Net shapes, unrolled network, SSDU split, SIREN, LoRA, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from semrecon_core.backbones.checkpoint import load_backbone, metadata_path, save_checkpoint
from semrecon_core.backbones.lora import apply_lora, count_parameters
from semrecon_core.backbones.siren import Adaptor, InrImage, Siren, SirenSpec, coordinate_grid
from semrecon_core.backbones.unet import UNet, UNetSpec
from semrecon_core.backbones.unrolled import UnrolledNet, ssdu_split
from semrecon_core.physics.sense import SenseOp


def _complex(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.complex64, generator=generator)


def test_paper_unet_architecture() -> None:
    net = UNet()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    widths = [block[0].out_channels for block in net.down]
    assert widths == [64, 128, 256, 512, 1024]
    assert convs[0].in_channels == 2 and net.output.out_channels == 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 2 * (5 + 4)


@pytest.mark.parametrize("shape", [(2, 32, 32), (1, 30, 27), (3, 17, 40)])
def test_unet_complex_in_out_any_size(shape: tuple[int, int, int]) -> None:
    net = UNet(UNetSpec(width=4, depth=3))
    out = net(_complex(*shape))
    assert out.shape == shape and out.dtype == torch.complex64
    with pytest.raises(ValueError, match="complex"):
        net(torch.randn(*shape))


def test_residual_unet_starts_as_identity() -> None:
    image = _complex(1, 20, 24)
    assert torch.equal(UNet(UNetSpec(width=4, depth=2, residual=True))(image), image)


def _operator(slices: int = 1, coils: int = 3, n: int = 24) -> tuple[SenseOp, torch.Tensor]:
    maps = _complex(slices, coils, n, n, seed=1)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    mask = torch.zeros(slices, n, n, dtype=torch.bool)
    mask[:, ::2] = True
    op = SenseOp(maps, mask)
    return op, op(_complex(slices, n, n, seed=2))


def test_unrolled_data_consistency_and_gradients() -> None:
    op, kspace = _operator()
    net = UnrolledNet(UNetSpec(width=4, depth=2, residual=True), stages=2, cg_iterations=30)
    out = net(op.adjoint(kspace), kspace, op)
    assert out.shape == (1, 24, 24)
    # an untrained (identity) stage followed by CG with small λ nearly fits the samples
    residual = (op(out) - kspace).norm() / kspace.norm()
    assert residual < 0.05
    out.abs().sum().backward()
    assert all(w.grad is not None and torch.isfinite(w.grad) for w in net.lams)  # one weight per stage
    assert all(p.grad is not None for p in net.denoisers[0].parameters() if p.requires_grad)


def test_ssdu_split_is_disjoint_and_complete() -> None:
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    mask[:, ::3] = True
    mask[:, 14:18] = True
    theta, held = ssdu_split(mask, holdout=0.4, generator=torch.Generator().manual_seed(0))
    assert not (theta & held).any()
    assert torch.equal(theta | held, mask)
    for s in range(2):
        assert abs(int(held[s].sum()) - round(0.4 * int(mask[s].sum()))) <= 1
    assert theta[:, 15:17, 15:17].all()  # the centre stays with the network
    with pytest.raises(ValueError, match="holdout"):
        ssdu_split(mask, holdout=1.5)


def test_siren_grid_and_init() -> None:
    grid = coordinate_grid((5, 7))
    assert grid.shape == (5, 7, 2)
    assert grid[..., 0].min() == -1 and grid[..., 1].max() == 1
    siren = Siren(SirenSpec())
    linear = [m for m in siren.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 8 and linear[0].in_features == 2  # 7 sine layers + linear output, 2-D coordinates
    assert linear[0].out_features == 256 and siren.spec.omega0 == 15
    inr = InrImage((2, 8, 9), SirenSpec(features=16, layers=3, omega0=30))
    image = inr()
    assert image.shape == (2, 8, 9) and image.dtype == torch.complex64
    # one 2-D SIREN per slice, all starting from the same weights: both slices start as the same image
    assert len(inr.sirens) == 2 and torch.equal(image[0], image[1])


def test_adaptor_is_the_authors_three_layer_tanh_cnn() -> None:
    adaptor = Adaptor()
    convolutions = [m for m in adaptor.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convolutions] == [256, 256, 2]
    out = adaptor(3 * _complex(1, 12, 12))
    assert out.shape == (1, 12, 12) and out.real.abs().max() < 1 and out.imag.abs().max() < 1  # tanh output


def test_lora_adapts_convolutions_only_adapters_train() -> None:
    torch.manual_seed(0)
    net = UNet(UNetSpec(width=4, depth=3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    full = count_parameters(net)
    apply_lora(net, 2)
    counts = count_parameters(net)
    assert full["trainable"] == full["total"]
    assert 0 < counts["trainable"] < full["total"] // 3
    lora_convs = [name for name, m in net.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in UNet(UNetSpec(width=4, depth=3)).modules())
    assert len(lora_convs) == n_convs
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    image = _complex(1, 16, 16)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        net(image).abs().mean().backward()
        optimizer.step()
    after = net.state_dict()
    for name, value in before.items():
        if "num_batches_tracked" in name or "running_" in name:
            continue
        mapped = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        key = name if name in after else mapped
        assert torch.equal(after[key], value), f"base weight {name} changed"
    assert any(after[k].abs().sum() > 0 for k in after if "lora_B" in k)  # B starts at zero, was trained


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UnrolledNet(UNetSpec(width=4, depth=2, residual=True), stages=2, cg_iterations=5)
    path = save_checkpoint(tmp_path / "w.safetensors", net, "unrolled", {"epochs": 3})
    meta = json.loads(metadata_path(path).read_text())
    assert meta["architecture"] == {"width": 4, "depth": 2, "residual": True, "stages": 2, "cg_iterations": 5}
    loaded, _ = load_backbone(path, "unrolled")
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="trained for backbone 'unrolled', not 'unet'"):
        load_backbone(path, "unet")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "w.pt", net, "unrolled", {})
    metadata_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="metadata file"):
        load_backbone(path, "unrolled")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp files left behind
