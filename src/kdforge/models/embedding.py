"""``embed_cnn``: a small CNN with an embedding head, for retrieval / re-identification.

Layout: three stages of (conv3x3-BN-ReLU) x 2 with 16w, 32w, 64w channels (2x2 max pooling after
the first two), global average pooling (``pool``), then the embedding head Linear(64w -> dim) ->
BatchNorm1d (``embedding``; the "BNNeck" of Luo et al., "Bag of Tricks and A Strong Baseline for
Deep Person Re-identification", CVPRW 2019), then a linear identity classifier (``logits``).

Contract (``kdforge.data.tasks.retrieval``): ``forward(x)`` returns identity logits, ``embed(x)``
the embedding that retrieval ranks. Feature points: ``stage1``..``stage3`` (and ``_preact``),
``pool``, ``embedding``, ``logits``; tap ``embedding`` for RKD or a triplet loss.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from kdforge.core.errors import ConfigError
from kdforge.models.common import check_multiplier, feature_point_table, init_weights, pooled_flatten, scale_width
from kdforge.models.factory import MODELS


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        bn1=nn.BatchNorm2d(cout),
        relu1=nn.ReLU(),
        conv2=nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        bn2=nn.BatchNorm2d(cout),
        preact=nn.Identity(),
        relu=nn.ReLU(),
    )
    if pool:
        layers["maxpool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


class EmbeddingNet(nn.Module):
    """Backbone -> pooled features -> embedding (Linear + BN) -> identity classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dim: int = 64) -> None:
        super().__init__()
        width = check_multiplier("embed_cnn", "width", width)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"embed_cnn: dim must be a positive whole number (embedding size), got {dim!r}")
        channels = [scale_width(c, width) for c in (16, 32, 64)]
        previous = in_channels
        for index, out in enumerate(channels, start=1):
            self.add_module(f"stage{index}", _block(previous, out, pool=index < 3))
            previous = out
        self.pool = pooled_flatten()
        self.neck = nn.Sequential(nn.Linear(previous, dim, bias=False), nn.BatchNorm1d(dim))
        self.classifier = nn.Linear(dim, num_classes)
        self.stage_channels = channels
        self.feature_dim = dim
        self.feature_points = feature_point_table(
            stem=None,
            stages=["stage1", "stage2", "stage3"],
            preacts=["stage1.preact", "stage2.preact", "stage3.preact"],
            embedding="neck",
        )
        init_weights(self)

    def embed(self, x: Tensor) -> Tensor:
        """The B x dim embedding ranked at retrieval time."""
        for name in ("stage1", "stage2", "stage3"):
            x = getattr(self, name)(x)
        return self.neck(self.pool(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


@MODELS.register("embed_cnn")
def embed_cnn(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: tuple[int, int] | None = None,
    width: float = 1.0,
    dim: int = 64,
) -> EmbeddingNet:
    """Retrieval CNN: 3 stages (16/32/64 x width channels), pooled, Linear+BN embedding of ``dim``, identity logits."""
    return EmbeddingNet(num_classes, in_channels, width, dim)


__all__ = ["EmbeddingNet", "embed_cnn"]
