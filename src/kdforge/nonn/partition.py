"""Partitions of the teacher's final-layer filters into one group per student.

Two families:

* ``louvain`` (NoNN, Bhardwaj et al. 2019): Louvain community detection (networkx, modularity
  with ``resolution`` 0.7) on the graph thresholded at the ``percentile``-th percentile of its
  non-zero weights. Communities are mapped to students as the NoNN framework
  (``SLDGroup/NoNN_framework``, ``ActivationNetwork.partition_activation_network``) does:
  singleton communities are merged into one group, groups are sorted by size, the largest ("P0",
  normally the merged rarely co-active filters) is discarded, the next N seed the N students and
  any further group joins the student that has the fewest filters so far. Group sizes are
  whatever the communities give (often very unbalanced) and some filters are mimicked by nobody.
* ``spectral`` (Jeong, Park, Yang, Electronics 10(14):1614, 2021; reconstructed from the paper's
  abstract, no public code): the Fiedler vector of the graph Laplacian ``L = D - W`` (or the
  normalised one) orders the filters so that correlated filters sit next to each other; the order
  is cut into N contiguous blocks of equal size (sizes differ by at most one).
  ``spectral_recursive`` bisects recursively with each part's own Fiedler vector;
  ``spectral_kway`` embeds the filters with the first N-1 non-trivial eigenvectors and runs
  size-constrained (balanced) k-means.

Groups are kept in an order in which *neighbouring* groups are related: the Fiedler order for the
spectral partitions, and the groups' mean Fiedler coordinate for Louvain. The averaging
redundancy (training targets and failed-device replacement) uses ``neighbors(i)`` = i-1 and i+1.

A ``Partition`` is saved as JSON (``format: kdforge-nonn-partition``) with its groups, the
discarded filters and statistics: sizes, weight within each group, weight between groups, their
per-pair densities, the balance (largest / smallest group) and the modularity.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdforge.core.errors import ConfigError

PARTITION_FORMAT = "kdforge-nonn-partition"
PARTITION_METHODS: tuple[str, ...] = ("louvain", "spectral", "spectral_recursive", "spectral_kway")
_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\s]+?)\s+\]")


# --------------------------------------------------------------------------- the file
@dataclass
class Partition:
    """Ordered filter groups (one per student) of a teacher layer with ``num_filters`` filters."""

    groups: list[list[int]]
    num_filters: int
    method: str = "spectral"
    settings: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = [sorted(int(f) for f in group) for group in self.groups]
        check_groups(self.groups, self.num_filters)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def discarded(self) -> list[int]:
        """Filters no student mimics (Louvain's discarded group)."""
        used = {f for group in self.groups for f in group}
        return [f for f in range(self.num_filters) if f not in used]

    def neighbors(self, index: int) -> list[int]:
        return group_neighbors(index, self.num_groups)

    def with_statistics(self, weights: np.ndarray) -> Partition:
        self.statistics = partition_statistics(weights, self.groups)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PARTITION_FORMAT,
            "version": 1,
            "method": self.method,
            "num_filters": self.num_filters,
            "num_groups": self.num_groups,
            "groups": self.groups,
            "discarded": self.discarded,
            "settings": self.settings,
            "statistics": self.statistics,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "partition") -> Partition:
        if data.get("format") != PARTITION_FORMAT:
            raise ConfigError(f"'{where}' is not a NoNN partition file (make one with `kdforge nonn-partition`)")
        return cls(
            groups=data["groups"],
            num_filters=int(data["num_filters"]),
            method=data.get("method", "unknown"),
            settings=data.get("settings", {}),
            statistics=data.get("statistics", {}),
            source=data.get("source", {}),
        )

    def save(self, path: str | Path) -> Path:
        from kdforge.core.checkpoint import atomic_write_text

        text = json.dumps(self.to_dict(), indent=1)
        # one line per list of numbers (groups, sizes), so the file reads as a table
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
        atomic_write_text(text + "\n", path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"partition file '{path}' not found; make one with `kdforge nonn-partition`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"partition file '{path}' is not JSON ({exc})") from None
        return cls.from_dict(data, str(path))


def check_groups(groups: list[list[int]], num_filters: int) -> None:
    """Groups must be non-empty, disjoint and inside ``0..num_filters-1``."""
    if not groups:
        raise ConfigError("a partition needs at least one group")
    seen: set[int] = set()
    for index, group in enumerate(groups):
        if not group:
            raise ConfigError(f"group {index} of the partition is empty")
        for f in group:
            if not 0 <= f < num_filters:
                raise ConfigError(f"group {index} names filter {f}, outside 0..{num_filters - 1}")
            if f in seen:
                raise ConfigError(f"filter {f} is in two groups; the groups of a partition are disjoint")
            seen.add(f)


def group_neighbors(index: int, count: int) -> list[int]:
    """The groups next to ``index`` in the partition's order (one at each end, two inside)."""
    return [j for j in (index - 1, index + 1) if 0 <= j < count]


def partition_statistics(weights: np.ndarray, groups: list[list[int]]) -> dict[str, Any]:
    """Sizes and weights: within each group, between groups (assigned filters only), touching
    discarded filters; per-pair densities; balance; modularity of the assigned subgraph."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    label = np.full(n, -1)
    for index, group in enumerate(groups):
        label[group] = index
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    assigned = label >= 0
    both = upper & assigned[:, None] & assigned[None, :]
    same = both & (label[:, None] == label[None, :])
    across = both & ~same
    within_each = [float(w[np.ix_(g, g)][np.triu_indices(len(g), k=1)].sum()) for g in groups]
    within = float(w[same].sum())
    between = float(w[across].sum())
    touching_discarded = float(w[upper & ~(assigned[:, None] & assigned[None, :])].sum())
    sizes = [len(g) for g in groups]
    stats: dict[str, Any] = {
        "sizes": sizes,
        "discarded": int((~assigned).sum()),
        "balance": max(sizes) / min(sizes),
        "within_weight": within_each,
        "within_total": within,
        "between_total": between,
        "discarded_weight": touching_discarded,
        "within_fraction": within / (within + between) if within + between > 0 else 0.0,
        "within_density": within / max(int(same.sum()), 1),
        "between_density": between / max(int(across.sum()), 1),
    }
    stats["modularity"] = _modularity(w, groups)
    return stats


def _modularity(w: np.ndarray, groups: list[list[int]]) -> float | None:
    import networkx as nx

    nodes = [f for g in groups for f in g]
    sub = w[np.ix_(nodes, nodes)]
    if sub.sum() <= 0:
        return None
    graph = _to_networkx(sub)
    position = {f: i for i, f in enumerate(nodes)}
    communities = [{position[f] for f in g} for g in groups]
    return float(nx.community.modularity(graph, communities, weight="weight"))


def _to_networkx(w: np.ndarray):
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(range(w.shape[0]))
    rows, cols = np.nonzero(np.triu(w, k=1))
    graph.add_weighted_edges_from((int(r), int(c), float(w[r, c])) for r, c in zip(rows, cols))
    return graph


# --------------------------------------------------------------------------- helpers
def _check_weights(weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ConfigError(f"a filter graph must be a square matrix, got shape {w.shape}")
    if (w < 0).any():
        raise ConfigError("filter graph weights must be non-negative")
    w = 0.5 * (w + w.T)
    np.fill_diagonal(w, 0.0)
    return w


def balanced_sizes(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total`` that differ by at most one (larger ones first)."""
    if parts < 1 or parts > total:
        raise ConfigError(f"cannot cut {total} filters into {parts} non-empty groups")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def laplacian(weights: np.ndarray, normalized: bool = False) -> np.ndarray:
    """``D - W``, or ``I - D^-1/2 W D^-1/2`` (isolated nodes get a zero row)."""
    w = _check_weights(weights)
    degree = w.sum(1)
    if not normalized:
        return np.diag(degree) - w
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    return np.diag((degree > 0).astype(float)) - inv[:, None] * w * inv[None, :]


def _connected(w: np.ndarray) -> np.ndarray:
    """A tiny uniform weight on every pair, so the graph is connected and the Fiedler vector is
    unique up to sign (it does not change which filters are close on a connected graph much)."""
    peak = float(w.max()) if w.size else 0.0
    eps = 1e-6 * (peak if peak > 0 else 1.0)
    out = w + eps
    np.fill_diagonal(out, 0.0)
    return out


def spectral_embedding(weights: np.ndarray, dimensions: int = 1, normalized: bool = False) -> np.ndarray:
    """The eigenvectors of the 2nd .. (dimensions+1)-th smallest Laplacian eigenvalues, as
    ``n x dimensions``; column 0 is the Fiedler vector. Signs are fixed so that the entry of
    largest magnitude of each column is positive (deterministic output)."""
    w = _connected(_check_weights(weights))
    _, vectors = np.linalg.eigh(laplacian(w, normalized))
    emb = vectors[:, 1 : 1 + dimensions].copy()
    for j in range(emb.shape[1]):
        pivot = np.argmax(np.abs(emb[:, j]))
        if emb[pivot, j] < 0:
            emb[:, j] *= -1
    return emb


def fiedler_vector(weights: np.ndarray, normalized: bool = False) -> np.ndarray:
    return spectral_embedding(weights, 1, normalized)[:, 0]


def _fiedler_order(weights: np.ndarray, normalized: bool) -> np.ndarray:
    return np.argsort(fiedler_vector(weights, normalized), kind="stable")


# --------------------------------------------------------------------------- partitioners
def spectral_groups(weights: np.ndarray, num_groups: int, normalized: bool = False) -> list[list[int]]:
    """Sort by the Fiedler coordinate, cut into ``num_groups`` equal contiguous blocks."""
    w = _check_weights(weights)
    order = _fiedler_order(w, normalized) if w.shape[0] > 1 else np.arange(w.shape[0])
    groups, start = [], 0
    for size in balanced_sizes(w.shape[0], num_groups):
        groups.append([int(f) for f in order[start : start + size]])
        start += size
    return groups


def recursive_spectral_groups(weights: np.ndarray, num_groups: int, normalized: bool = False) -> list[list[int]]:
    """Recursive Fiedler bisection into balanced sizes: a part that must hold k groups is split
    into parts holding floor(k/2) and ceil(k/2) groups, each sized to the sum of its groups."""
    w = _check_weights(weights)
    sizes = balanced_sizes(w.shape[0], num_groups)

    def split(nodes: np.ndarray, wanted: list[int]) -> list[list[int]]:
        if len(wanted) == 1:
            return [[int(f) for f in nodes]]
        left_count = len(wanted) // 2
        left_size = sum(wanted[:left_count])
        sub = w[np.ix_(nodes, nodes)]
        order = nodes[_fiedler_order(sub, normalized)] if len(nodes) > 1 else nodes
        return split(order[:left_size], wanted[:left_count]) + split(order[left_size:], wanted[left_count:])

    return split(np.arange(w.shape[0]), sizes)


def kway_spectral_groups(
    weights: np.ndarray, num_groups: int, normalized: bool = False, iterations: int = 50
) -> list[list[int]]:
    """Balanced k-means on the first ``num_groups - 1`` non-trivial eigenvectors: each step assigns
    filters to centroids under the group-size limits (an optimal assignment, scipy's
    ``linear_sum_assignment``), then moves the centroids; starts from the Fiedler-order blocks."""
    from scipy.optimize import linear_sum_assignment

    w = _check_weights(weights)
    n = w.shape[0]
    sizes = balanced_sizes(n, num_groups)
    if num_groups == 1:
        return [list(range(n))]
    emb = spectral_embedding(w, max(num_groups - 1, 1), normalized)
    labels = np.empty(n, dtype=int)
    for j, group in enumerate(spectral_groups(w, num_groups, normalized)):
        labels[group] = j
    slot_group = np.repeat(np.arange(num_groups), sizes)
    for _ in range(iterations):
        centroids = np.stack([emb[labels == j].mean(0) for j in range(num_groups)])
        cost = ((emb[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # n x groups
        rows, slots = linear_sum_assignment(cost[:, slot_group])
        new = np.empty(n, dtype=int)
        new[rows] = slot_group[slots]
        if np.array_equal(new, labels):
            break
        labels = new
    groups = [[int(f) for f in np.flatnonzero(labels == j)] for j in range(num_groups)]
    return _order_by_fiedler(w, groups, normalized)


def _order_by_fiedler(w: np.ndarray, groups: list[list[int]], normalized: bool) -> list[list[int]]:
    fiedler = fiedler_vector(w, normalized)
    return sorted(groups, key=lambda g: (float(np.mean(fiedler[g])), g[0]))


def louvain_groups(
    weights: np.ndarray,
    num_groups: int,
    *,
    percentile: float | None = 99.0,
    resolution: float = 0.7,
    seed: int = 0,
    discard_largest: bool = True,
    underfull: str = "split",
    report: dict[str, Any] | None = None,
) -> list[list[int]]:
    """NoNN: Louvain communities of the thresholded graph, mapped to ``num_groups`` students.

    With fewer usable communities than students, ``underfull="split"`` cuts the largest group in
    two along its own Fiedler order until there are enough (recorded in ``report["splits"]``);
    ``"error"`` raises instead (NoNN itself would deploy fewer students).
    """
    import networkx as nx

    from kdforge.nonn.graph import threshold_graph

    w = _check_weights(weights)
    sparse = threshold_graph(w, percentile)
    communities = nx.community.louvain_communities(
        _to_networkx(sparse), weight="weight", resolution=resolution, seed=seed
    )
    singles = sorted(f for c in communities if len(c) == 1 for f in c)
    groups = [sorted(int(f) for f in c) for c in communities if len(c) > 1]
    if singles:
        groups.append([int(f) for f in singles])
    groups.sort(key=lambda g: (-len(g), g[0]))
    if discard_largest:
        groups = groups[1:]
    found = len(groups)
    splits = 0
    if underfull not in ("split", "error"):
        raise ConfigError(f"underfull must be 'split' or 'error', got {underfull!r}")
    while underfull == "split" and 0 < len(groups) < num_groups and max(len(g) for g in groups) > 1:
        largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
        nodes = np.array(groups.pop(largest))
        order = nodes[_fiedler_order(w[np.ix_(nodes, nodes)], False)]
        half = (len(order) + 1) // 2
        groups += [sorted(int(f) for f in order[:half]), sorted(int(f) for f in order[half:])]
        splits += 1
    if report is not None:
        report.update({"communities": found, "splits": splits})
    if len(groups) < num_groups:
        raise ConfigError(
            f"Louvain found {len(groups)} usable communit{'y' if len(groups) == 1 else 'ies'} "
            f"({'after discarding the largest, ' if discard_largest else ''}percentile {percentile}, "
            f"resolution {resolution}) but {num_groups} students need one each; lower the percentile, "
            "raise the resolution, use fewer students, or use a spectral partition"
        )
    students = [list(g) for g in groups[:num_groups]]
    for group in groups[num_groups:]:
        smallest = min(range(num_groups), key=lambda i: (len(students[i]), i))
        students[smallest].extend(group)
    students = [sorted(g) for g in students]
    return _order_by_fiedler(w, students, normalized=False)


def partition_filters(
    weights: np.ndarray,
    num_groups: int,
    method: str = "spectral",
    *,
    percentile: float | None = 99.0,
    resolution: float = 0.7,
    seed: int = 0,
    normalized: bool = False,
    discard_largest: bool = True,
    underfull: str = "split",
    settings: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Partition:
    """Partition the filters of graph ``weights`` into ``num_groups`` groups with ``method``
    (``louvain``, ``spectral``, ``spectral_recursive`` or ``spectral_kway``), with statistics."""
    w = _check_weights(weights)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ConfigError(f"the number of groups must be a positive integer, got {num_groups!r}")
    if method == "louvain":
        report: dict[str, Any] = {}
        groups = louvain_groups(
            w,
            num_groups,
            percentile=percentile,
            resolution=resolution,
            seed=seed,
            discard_largest=discard_largest,
            underfull=underfull,
            report=report,
        )
        used = {
            "percentile": percentile,
            "resolution": resolution,
            "seed": seed,
            "discard_largest": discard_largest,
            "underfull": underfull,
            **report,
        }
    elif method == "spectral":
        groups, used = spectral_groups(w, num_groups, normalized), {"normalized": normalized}
    elif method == "spectral_recursive":
        groups, used = recursive_spectral_groups(w, num_groups, normalized), {"normalized": normalized}
    elif method == "spectral_kway":
        groups, used = kway_spectral_groups(w, num_groups, normalized), {"normalized": normalized}
    else:
        raise ConfigError(f"unknown partition method '{method}'; choose one of {', '.join(PARTITION_METHODS)}")
    partition = Partition(groups, w.shape[0], method, {**(settings or {}), **used}, source=source or {})
    return partition.with_statistics(w)


__all__ = [
    "PARTITION_FORMAT",
    "PARTITION_METHODS",
    "Partition",
    "balanced_sizes",
    "check_groups",
    "fiedler_vector",
    "group_neighbors",
    "kway_spectral_groups",
    "laplacian",
    "louvain_groups",
    "partition_filters",
    "partition_statistics",
    "recursive_spectral_groups",
    "spectral_embedding",
    "spectral_groups",
]
