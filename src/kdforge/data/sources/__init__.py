"""Dataset sources; importing this package registers every one of them in ``DATASETS``."""

from kdforge.data.sources import (  # noqa: F401  (registers every source)
    cifar,
    digits,
    idx,
    imagefolder,
    npz,
    paired,
    retrieval,
    rotated,
    segmnist,
    tabular,
)
