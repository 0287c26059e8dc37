"""The paper's U-Net (§2.4) acting on complex images.

Five levels with 64, 128, 256, 512, 1024 channels, two 3×3 convolutions + BatchNorm + ReLU per level,
max-pool down, transposed-convolution up, skip connections by concatenation, a 1×1 output convolution
from 64 to 2 channels and no output activation. Width and depth are configurable (tests use small nets).
Input and output are complex ``(slices, y, x)`` images; the two real channels (real, imaginary) exist
only inside. Images whose size is not divisible by ``2**(depth-1)`` are zero-padded and cropped back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class UNetSpec:
    """U-Net architecture: ``depth`` levels, ``width`` channels at the first level (doubling per level).

    ``residual`` adds the input to the output (``x + D(x)``) and zero-initialises the output convolution;
    the paper's U-Net has none, the unrolled network's denoisers use it so an untrained stage is the identity.
    """

    width: int = 64
    depth: int = 5
    residual: bool = False

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"U-Net: width and depth must be positive, found width={self.width} depth={self.depth}")

    def to_dict(self) -> dict[str, int | bool]:
        """JSON-serialisable form (checkpoint metadata)."""
        return asdict(self)


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def complex_to_channels(image: torch.Tensor) -> torch.Tensor:
    """Complex ``(slices, y, x)`` → real ``(slices, 2, y, x)`` (real, imaginary)."""
    return torch.view_as_real(image).permute(0, 3, 1, 2)


def channels_to_complex(channels: torch.Tensor) -> torch.Tensor:
    """Real ``(slices, 2, y, x)`` → complex64 ``(slices, y, x)``."""
    return torch.complex(channels[:, 0].float(), channels[:, 1].float())


class UNet(nn.Module):
    """Complex-in, complex-out U-Net: ``forward((slices, y, x) complex) -> (slices, y, x) complex``."""

    def __init__(self, spec: UNetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or UNetSpec()
        widths = [self.spec.width * 2**level for level in range(self.spec.depth)]
        self.down = nn.ModuleList()
        in_channels = 2
        for channels in widths:
            self.down.append(_double_conv(in_channels, channels))
            in_channels = channels
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for channels in reversed(widths[:-1]):
            self.upsample.append(nn.ConvTranspose2d(channels * 2, channels, 2, stride=2))
            self.up.append(_double_conv(channels * 2, channels))
        self.output = nn.Conv2d(widths[0], 2, 1)
        if self.spec.residual:
            assert self.output.bias is not None  # Conv2d(bias=True)
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map a complex ``(slices, y, x)`` image to a complex image of the same shape."""
        if image.ndim != 3 or not image.is_complex():
            raise ValueError(
                f"U-Net input: expected a complex (slices, y, x) image, found {image.dtype} {tuple(image.shape)}"
            )
        height, width = image.shape[-2:]
        multiple = 2 ** (self.spec.depth - 1)
        pad_y, pad_x = (-height) % multiple, (-width) % multiple
        x = complex_to_channels(image)
        if pad_y or pad_x:
            x = F.pad(x, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for upsample, block in zip(self.upsample, self.up, strict=True):
            x = block(torch.cat([skips.pop(), upsample(x)], dim=1))
        x = self.output(x)
        x = x[..., pad_y // 2 : pad_y // 2 + height, pad_x // 2 : pad_x // 2 + width]
        out = channels_to_complex(x)
        return image + out if self.spec.residual else out
