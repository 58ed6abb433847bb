"""Sensor models: the same scene as a second, different sensor would record it.

Each model is a fixed, deterministic function of a uint8 image batch N x C x H x W (C = 1 or 3) that
returns the new sensor's uint8 images; seeded noise is keyed by the sample's source index, so a
sample's reading never depends on which subset it was drawn into. They stand in for a real sensor
upgrade (an RGB camera replaced by a multispectral one, Van Molle et al., Sensors 2021):

``gray_edge``
    A monochrome camera with an on-sensor edge output (as event and gradient sensors give):
    channel 0 is the luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601; a gray image is
    its own luminance), channel 1 the Sobel gradient magnitude of ``Y``,
    ``sqrt(Gx^2 + Gy^2) / 4`` clipped to 255 (zero padding at the border). 2 channels.
``spectral``
    A camera with different spectral bands (RGB inputs only): band 1 ``0.6 R + 0.4 G``
    (red edge), band 2 ``0.2 R + 0.5 G + 0.3 B`` (panchromatic), band 3 ``0.1 G + 0.9 B``
    (blue), then a square-root response (``255 sqrt(x / 255)``, as a sensor with a compressive
    gain curve). Colour information is mixed, not lost, but no channel matches an RGB one.
``lowres_noise``
    A cheaper sensor with half the resolution and read noise: 2 x 2 area averaging (H/2 x W/2),
    then additive Gaussian noise of standard deviation ``noise_std`` grey levels (default 8),
    rounded and clipped to 0..255.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.core.errors import ConfigError, closest
from kdforge.data.hashing import derive_seed

SENSORS = ("gray_edge", "spectral", "lowres_noise")
_LUMA = (0.299, 0.587, 0.114)
_SPECTRAL_BANDS = ((0.6, 0.4, 0.0), (0.2, 0.5, 0.3), (0.0, 0.1, 0.9))
_NOISE_STREAM = 21
_CHUNK = 8192


def luminance(images: torch.Tensor) -> torch.Tensor:
    """float32 N x 1 x H x W luminance (0..255) of uint8 gray or RGB images."""
    values = images.to(torch.float32)
    if values.shape[1] == 1:
        return values
    weights = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    return (values * weights).sum(dim=1, keepdim=True)


def gray_edge(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 2 x H x W: luminance and Sobel gradient magnitude / 4."""
    luma = luminance(images)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = F.conv2d(luma, sobel_x, padding=1)
    gy = F.conv2d(luma, sobel_x.transpose(2, 3), padding=1)
    edges = (gx.square() + gy.square()).sqrt() / 4.0
    return torch.cat([luma, edges], dim=1).round().clamp(0, 255).to(torch.uint8)


def spectral(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W: three mixed bands with a square-root response."""
    if images.shape[1] != 3:
        raise ConfigError(
            f"sensor 'spectral' mixes red, green and blue bands and needs RGB images, got {images.shape[1]} "
            "channel(s); "
            "use gray_edge or lowres_noise"
        )
    bands = torch.tensor(_SPECTRAL_BANDS, dtype=torch.float32)
    mixed = torch.einsum("oc,nchw->nohw", bands, images.to(torch.float32))
    return (255.0 * (mixed / 255.0).clamp(0, 1).sqrt()).round().to(torch.uint8)


def lowres_noise(images: torch.Tensor, index: torch.Tensor, seed: int, noise_std: float = 8.0) -> torch.Tensor:
    """uint8 N x C x H/2 x W/2: 2 x 2 area averaging plus Gaussian noise keyed by (seed, index)."""
    small = F.avg_pool2d(images.to(torch.float32), 2)
    noise = torch.empty_like(small)
    for row, sample in enumerate(index.tolist()):  # a generator per sample: independent of the batch
        generator = torch.Generator().manual_seed(derive_seed(seed, _NOISE_STREAM, int(sample)))
        noise[row] = torch.randn(small.shape[1:], generator=generator)
    return (small + noise_std * noise).round().clamp(0, 255).to(torch.uint8)


def apply_sensor(
    name: str, images: torch.Tensor, index: torch.Tensor, seed: int = 0, noise_std: float = 8.0
) -> torch.Tensor:
    """The images as sensor ``name`` records them (see the module docstring), in chunks."""
    if name not in SENSORS:
        raise ConfigError(f"unknown sensor '{name}'{closest(name, list(SENSORS))}; sensors: {', '.join(SENSORS)}")
    parts = []
    for start in range(0, images.shape[0], _CHUNK):
        chunk, chunk_index = images[start : start + _CHUNK], index[start : start + _CHUNK]
        if name == "gray_edge":
            parts.append(gray_edge(chunk))
        elif name == "spectral":
            parts.append(spectral(chunk))
        else:
            parts.append(lowres_noise(chunk, chunk_index, seed, noise_std))
    return torch.cat(parts) if parts else images
