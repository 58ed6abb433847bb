"""Dataset sources; importing this package registers every one of them in ``DATASETS``."""

from kdforge.data.sources import cifar, digits, idx, imagefolder, npz, paired, retrieval, rotated, tabular  # noqa: F401
