"""SIREN implicit neural representation of a complex image, and the authors' CNN adaptor.

``Siren`` maps 2-D pixel coordinates in [-1, 1] to (real, imaginary) with sine layers (Sitzmann et al. 2020):
``layers`` linear layers in all (the last one a linear output with 2 features; 8 × 256 by default, as the
authors), ``omega0`` (15 in the public code) and the SIREN weight initialisation. :class:`InrImage` represents a
``(slices, y, x)`` volume with one 2-D SIREN per slice (the paper's INR is per image), each initialised alike.
:class:`Adaptor` is the authors' 3-layer CNN (256 features, ReLU, ReLU, tanh) of the public code's INR.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from semrecon_core.backbones.unet import channels_to_complex, complex_to_channels


@dataclass(frozen=True, kw_only=True)
class SirenSpec:
    """SIREN architecture: ``layers`` linear layers in all, frequency ``omega0``.

    ``layers − 1`` sine layers of ``features`` units, then a linear output.
    """

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

    def __init__(self, spec: SirenSpec | None = None, *, in_features: int = 2) -> None:
        super().__init__()
        self.spec = spec or SirenSpec()
        if self.spec.layers < 2:
            raise ValueError(f"SIREN: expected at least 2 linear layers, found {self.spec.layers}")
        layers: list[nn.Module] = []
        features = in_features
        for index in range(self.spec.layers - 1):
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


def coordinate_grid(shape: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel-centre coordinates ``(y, x, 2)`` in [-1, 1] of a ``shape`` image."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


class InrImage(nn.Module):
    """One 2-D SIREN per slice of a ``(slices, y, x)`` image: ``forward() -> complex (slices, y, x)``.

    Every slice's SIREN starts from the same weights (drawn once), so a slice's fit does not depend on the
    other slices of its batch.
    """

    coords: torch.Tensor

    def __init__(self, shape: tuple[int, int, int], spec: SirenSpec | None = None) -> None:
        super().__init__()
        first = Siren(spec)
        self.sirens = nn.ModuleList([first, *(copy.deepcopy(first) for _ in range(shape[0] - 1))])
        self.register_buffer("coords", coordinate_grid((shape[1], shape[2])))

    def forward(self) -> torch.Tensor:
        """The represented complex image."""
        out = torch.stack([siren(self.coords) for siren in self.sirens]).float()
        return torch.complex(out[..., 0], out[..., 1])


class Adaptor(nn.Module):
    """The authors' CNN adaptor: 3 convolutions (``features`` channels, ReLU, ReLU, tanh) on a complex image."""

    def __init__(self, features: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, 2, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Complex ``(slices, y, x)`` → complex image of the same shape (values in the tanh range)."""
        return channels_to_complex(self.net(complex_to_channels(image)))
