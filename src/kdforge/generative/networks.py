"""Small conditional GANs for 28x28 (1 channel) and 32x32 (3 channels) images.

* Generator: DCGAN/SNGAN-style. A latent ``z`` is mapped by a linear layer to a 7x7 (28x28
  output) or 4x4 (32x32 output) feature map, then upsampled (nearest x2 + 3x3 conv) to the
  image size. Every upsampling block normalises with *conditional* BatchNorm: the affine scale and
  shift come from the label embedding, so each class (or label value) gets its own feature
  statistics (Miyato & Koyama 2018; de Vries et al. 2017). Output: ``tanh``, pixels in [-1, 1].
* Discriminator: strided convolutions with spectral normalisation on every weight (Miyato et al.,
  ICLR 2018), a global sum pool to a feature ``h``, and the *projection* head
  ``D(x, y) = w^T h + <embed(y), h>`` (Miyato & Koyama, ICLR 2018).

Labels are embedded by :class:`LabelEmbedding`: a lookup table for class indices, or, for a
continuous scalar label in [0, 1] (CcGAN, Ding et al., ICLR 2021), a small MLP of the label so that
nearby labels get nearby embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class LabelEmbedding(nn.Module):
    """A label -> vector map: ``nn.Embedding`` for ``num_classes`` classes, an MLP of a scalar in
    [0, 1] when ``num_classes`` is None (continuous labels)."""

    def __init__(self, num_classes: int | None, dim: int, spectral: bool = False) -> None:
        super().__init__()
        self.continuous = num_classes is None
        self.net: nn.Module
        wrap = spectral_norm if spectral else (lambda m: m)
        if self.continuous:
            self.net = nn.Sequential(wrap(nn.Linear(1, dim)), nn.ReLU(), wrap(nn.Linear(dim, dim)))
        else:
            self.net = nn.Embedding(int(num_classes), dim)  # type: ignore[arg-type]
            if spectral:
                self.net = spectral_norm(self.net)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            return self.net(labels.float().reshape(-1, 1))
        return self.net(labels.long())


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine, scaled by ``1 + gamma(e)`` and shifted by ``beta(e)`` of the
    label embedding ``e`` (initialised to the identity)."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Linear(embed_dim, channels)
        self.beta = nn.Linear(embed_dim, channels)
        for layer in (self.gamma, self.beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.gamma(embedding)[:, :, None, None]
        shift = self.beta(embedding)[:, :, None, None]
        return self.norm(x) * scale + shift


class _UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.norm = ConditionalBatchNorm(in_channels, embed_dim)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(x, embedding))
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _start_size(image_size: int) -> tuple[int, int]:
    """(start resolution, number of x2 upsamplings) for a supported image size."""
    sizes = {8: (4, 1), 16: (4, 2), 28: (7, 2), 32: (4, 3), 64: (4, 4)}
    if image_size not in sizes:
        raise ValueError(f"image size {image_size} is not supported by the conditional GAN; use 8, 16, 28, 32 or 64")
    return sizes[image_size]


class ConditionalGenerator(nn.Module):
    """``G(z, y)`` -> images B x C x S x S in [-1, 1]."""

    def __init__(
        self,
        num_classes: int | None,
        image_size: int = 28,
        channels: int = 1,
        latent_dim: int = 64,
        width: int = 64,
        embed_dim: int = 64,
    ) -> None:
        super().__init__()
        start, ups = _start_size(image_size)
        self.latent_dim = latent_dim
        self.start = start
        self.top = width * 2 ** (ups - 1)
        self.embedding = LabelEmbedding(num_classes, embed_dim)
        self.project = nn.Linear(latent_dim, self.top * start * start)
        widths = [self.top // 2**i for i in range(ups + 1)]
        self.blocks = nn.ModuleList(_UpBlock(a, b, embed_dim) for a, b in zip(widths[:-1], widths[1:]))
        self.final_norm = nn.BatchNorm2d(widths[-1])
        self.to_image = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(labels)
        x = self.project(z).view(z.shape[0], self.top, self.start, self.start)
        for block in self.blocks:
            x = block(x, embedding)
        return torch.tanh(self.to_image(F.relu(self.final_norm(x))))


class ProjectionDiscriminator(nn.Module):
    """``D(x, y) = w^T h(x) + <embed(y), h(x)>`` with spectral normalisation everywhere; returns B logits."""

    def __init__(self, num_classes: int | None, image_size: int = 28, channels: int = 1, width: int = 64) -> None:
        super().__init__()
        _start_size(image_size)
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(channels, width, 3, padding=1)), nn.LeakyReLU(0.1)]
        current = width
        for _ in range(2 if image_size <= 32 else 3):
            layers += [
                spectral_norm(nn.Conv2d(current, current * 2, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.1),
                spectral_norm(nn.Conv2d(current * 2, current * 2, 3, padding=1)),
                nn.LeakyReLU(0.1),
            ]
            current *= 2
        self.features = nn.Sequential(*layers)
        self.linear = spectral_norm(nn.Linear(current, 1))
        self.embedding = LabelEmbedding(num_classes, current, spectral=True)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(images).sum(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embedding(labels) * h).sum(dim=1)
