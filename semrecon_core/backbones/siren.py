"""SIREN implicit neural representation of a complex image, and the public code's CNN adaptor.

``Siren`` maps coordinates in [-1, 1] to (real, imaginary) with sine layers (Sitzmann et al. 2020):
8 layers × 256 features by default, ``omega0`` configurable (15 in the public code), the SIREN weight
initialisation, a linear output with 2 features. :class:`InrImage` evaluates it on the pixel grid of a
``(slices, y, x)`` volume (the slice coordinate is a third input, 0 for a single slice).
:class:`Adaptor` is the 3-layer CNN of the public code's second phase (residual, so it starts as identity).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from semrecon_core.backbones.unet import channels_to_complex, complex_to_channels


@dataclass(frozen=True, kw_only=True)
class SirenSpec:
    """SIREN architecture: ``layers`` sine layers of ``features`` units, frequency ``omega0``."""

    features: int = 256
    layers: int = 8
    omega0: float = 15.0

    def to_dict(self) -> dict[str, float]:
        """JSON-serialisable form."""
        return asdict(self)


class SineLayer(nn.Module):
    """``sin(ω0 · (W x + b))`` with SIREN initialisation (first layer U(-1/n, 1/n), others U(-√(6/n)/ω0, ·))."""

    def __init__(self, in_features: int, out_features: int, *, omega0: float, first: bool) -> None:
        super().__init__()
        self.omega0 = omega0
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if first else math.sqrt(6.0 / in_features) / omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the sine layer."""
        return torch.sin(self.omega0 * self.linear(x))


class Siren(nn.Module):
    """Coordinates ``(..., in_features)`` in [-1, 1] → ``(..., 2)`` real outputs."""

    def __init__(self, spec: SirenSpec | None = None, *, in_features: int = 3) -> None:
        super().__init__()
        self.spec = spec or SirenSpec()
        layers: list[nn.Module] = []
        features = in_features
        for index in range(self.spec.layers):
            layers.append(SineLayer(features, self.spec.features, omega0=self.spec.omega0, first=index == 0))
            features = self.spec.features
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, 2)
        bound = math.sqrt(6.0 / features) / self.spec.omega0
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Evaluate the network at ``coords``."""
        return self.head(self.body(coords))


def coordinate_grid(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel-centre coordinates ``(slices, y, x, 3)`` in [-1, 1] (slice axis 0 when there is one slice)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


class InrImage(nn.Module):
    """A SIREN evaluated on the grid of a ``(slices, y, x)`` image: ``forward() -> complex (slices, y, x)``."""

    def __init__(self, shape: tuple[int, int, int], spec: SirenSpec | None = None) -> None:
        super().__init__()
        self.siren = Siren(spec)
        self.register_buffer("coords", coordinate_grid(shape))

    def forward(self) -> torch.Tensor:
        """The represented complex image."""
        out = self.siren(self.coords).float()
        return torch.complex(out[..., 0], out[..., 1])


class Adaptor(nn.Module):
    """3-layer CNN refining a complex image (residual; last layer zero-initialised so it starts as identity)."""

    def __init__(self, features: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, 2, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Complex ``(slices, y, x)`` → refined complex image of the same shape."""
        return image + channels_to_complex(self.net(complex_to_channels(image)))
