"""Published top-1 numbers of the methods, for the report's "paper" column.

Each :class:`Reference` is one cell of a published table: a method, a dataset, a teacher and a
student (zoo names; ``teacher`` is ``None`` for the student trained alone, method ``ce``) and the
top-1 accuracy (%) the source reports. The numbers were transcribed from the results tables named
in ``source``; they are the authors' own runs
under the standard CIFAR-100 schedule: 240 epochs on the full training set, SGD lr 0.05 (x0.1 at
150/180/210), batch 64, weight decay 5e-4. Both RepDistiller and mdistiller report the best test
accuracy seen during training, so they correspond to "best epoch, selected on test".

:func:`lookup` returns a reference only when all four keys match exactly; nothing is inferred
across architectures, datasets or variants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    method: str
    dataset: str
    teacher: str | None
    student: str
    top1: float
    source: str
    epochs: int = 240  # the training budget behind the number
    selection: str = "test"  # the published number is the best test accuracy during training


REPDISTILLER = "RepDistiller README (CIFAR-100)"
MDISTILLER = "mdistiller README (CIFAR-100)"

# The five same-family pairs of the CIFAR-100 benchmark, in the column order of its tables.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("wrn_40_2", "wrn_16_2"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
)

# method -> top-1 per pair above (RepDistiller's benchmark tables; CRD without the extra KD term).
_REPDISTILLER_TABLE: dict[str, tuple[float, float, float, float, float]] = {
    "kd": (74.92, 70.66, 73.08, 73.33, 72.98),
    "fitnet": (73.58, 69.21, 71.06, 73.50, 71.02),
    "at": (74.08, 70.55, 72.31, 73.44, 71.43),
    "fsp": (72.91, 69.95, 71.89, 72.62, 70.23),
    "rkd": (73.35, 69.61, 71.82, 71.90, 71.48),
    "sp": (73.83, 69.67, 72.69, 72.94, 72.68),
    "pkt": (74.54, 70.34, 72.61, 73.64, 72.88),
    "crd": (75.48, 71.16, 73.48, 75.51, 73.94),
}
_STUDENT_ALONE = (73.26, 69.06, 71.14, 72.50, 70.36)

# DKD as reported by its authors' library, with their per-pair beta (2 for the resnet56 and
# resnet110 pairs, 6 for the WRN and VGG pairs, 8 for resnet32x4 -> resnet8x4).
_DKD: tuple[tuple[str, str, float], ...] = (
    ("resnet56", "resnet20", 71.97),
    ("resnet110", "resnet32", 74.11),
    ("resnet32x4", "resnet8x4", 76.32),
    ("wrn_40_2", "wrn_16_2", 76.23),
    ("wrn_40_2", "wrn_40_1", 74.81),
    ("vgg13", "vgg8", 74.68),
)


# ReviewKD (Chen, Liu, Zhao, Jia, CVPR 2021), its paper's Tables 1-2 as copied by the DKD paper and a
# KD++ reproduction README (the paper's own tables were not re-opened).
REVIEWKD = "ReviewKD paper, Tables 1-2 (CIFAR-100)"
_REVIEW_KD: tuple[tuple[str, str, float], ...] = (
    ("wrn_40_2", "wrn_16_2", 76.12),
    ("resnet56", "resnet20", 71.89),
    ("resnet110", "resnet32", 73.89),
    ("resnet32x4", "resnet8x4", 75.63),
    ("vgg13", "vgg8", 74.84),
    ("wrn_40_2", "wrn_40_1", 75.09),
)
# HKD without the extra KD term, from the HKD README's Table 1 (CIFAR-100).
HKD_README = "HKD README, Table 1 (CIFAR-100)"


def _build() -> tuple[Reference, ...]:
    entries: list[Reference] = []
    for (_teacher, student), top1 in zip(_PAIRS, _STUDENT_ALONE):
        entries.append(Reference("ce", "cifar100", None, student, top1, REPDISTILLER))
    for method, row in _REPDISTILLER_TABLE.items():
        for (teacher, student), top1 in zip(_PAIRS, row):
            entries.append(Reference(method, "cifar100", teacher, student, top1, REPDISTILLER))
    for teacher, student, top1 in _DKD:
        entries.append(Reference("dkd", "cifar100", teacher, student, top1, MDISTILLER))
    for teacher, student, top1 in _REVIEW_KD:
        entries.append(Reference("review_kd", "cifar100", teacher, student, top1, REVIEWKD))
    entries.append(Reference("hkd", "cifar100", "resnet32x4", "resnet8x4", 75.63, HKD_README))
    return tuple(entries)


REFERENCES: tuple[Reference, ...] = _build()


def lookup(method: str, dataset: str, teacher: str | None, student: str) -> Reference | None:
    """The published number for exactly this (method, dataset, teacher, student), else None.

    For the student alone (method ``ce``) the teacher must be ``None``.
    """
    for reference in REFERENCES:
        if (reference.method, reference.dataset, reference.teacher, reference.student) == (
            method,
            dataset,
            teacher,
            student,
        ):
            return reference
    return None


__all__ = ["REFERENCES", "Reference", "lookup"]
