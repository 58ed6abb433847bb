"""Retrieval (re-identification): rank a gallery by embedding distance to each query.

Contract with the network:

* ``forward(x)`` returns **identity logits** (one per training identity); the supervised loss is
  cross-entropy on them, so ``ce``, ``kd`` (with an annealed temperature) and the feature methods
  train a retrieval network exactly as they train a classifier;
* the **embedding** that is ranked at evaluation is ``model.embed(x)`` when the network defines it
  (``kdforge.models.embedding.EmbeddingNet``), else the ``pool`` feature point of a kdforge zoo
  network (the classifier's input), else the output of ``forward`` itself
  (:meth:`Retrieval.predict`).

Targets of an evaluated split are either ``N`` identity indices (every sample is a query against all
the others: leave-one-out, used for a validation split carved from train) or ``N x 2`` rows
``(identity, is_query)``: queries are ranked against the gallery (every row with ``is_query == 0``),
as re-ID benchmarks do. Embeddings are L2-normalised and compared by Euclidean distance (the
ranking of cosine similarity); ties are broken by gallery position.

Metrics (percent): ``rank1``, ``rank5``, ``rank10`` (the CMC curve: a true match among the first k),
``map`` (mean average precision over queries), ``recall10`` (the mean fraction of a query's true
matches found in its first 10: the information-retrieval recall, not the CMC). Queries without any
true match in the gallery are skipped, as in the Market-1501 protocol. The primary metric is mAP.
The evaluator keeps every embedding of the split, so it is not shardable: under DDP every rank
ranks the whole split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.core.errors import DataError
from kdforge.data.tasks.base import TASKS, Evaluator, Reduce, Task

CMC_RANKS = (1, 5, 10)
RECALL_AT = 10


def retrieval_metrics(
    query: torch.Tensor,
    query_ids: torch.Tensor,
    gallery: torch.Tensor,
    gallery_ids: torch.Tensor,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> dict[str, float]:
    """CMC ranks, mAP and recall@10 (percent) of ``query`` (Q x D) against ``gallery`` (G x D).

    Embeddings are compared by Euclidean distance as given (normalise them first for cosine).
    ``exclude_self`` (leave-one-out: query and gallery are the same set) drops each query's own
    row. Queries whose identity is absent from the gallery are not counted.
    """
    cmc = torch.zeros(len(CMC_RANKS), dtype=torch.float64)
    ap_sum = recall_sum = 0.0
    counted = 0
    gallery = gallery.double()
    for start in range(0, len(query), chunk):
        q = query[start : start + chunk].double()
        distances = torch.cdist(q, gallery)
        if exclude_self:
            rows = torch.arange(len(q))
            distances[rows, rows + start] = float("inf")
        # a stable sort: equal distances keep gallery order, so the ranking is deterministic
        order = torch.sort(distances, dim=1, stable=True).indices
        matches = gallery_ids[order] == query_ids[start : start + chunk].unsqueeze(1)
        if exclude_self:  # the query itself sorts last (infinite distance); drop that column
            own = order == (torch.arange(len(q)) + start).unsqueeze(1)
            matches = matches & ~own
        relevant = matches.sum(1)
        valid = relevant > 0
        if not valid.any():
            continue
        matches, relevant = matches[valid].double(), relevant[valid].double()
        first_hit = matches.argmax(1)  # position of the first true match (exists: valid rows)
        for column, k in enumerate(CMC_RANKS):
            cmc[column] += float((first_hit < k).sum())
        hits_so_far = matches.cumsum(1)
        positions = torch.arange(1, matches.shape[1] + 1, dtype=torch.float64)
        precision_at_hits = (hits_so_far / positions) * matches
        ap_sum += float((precision_at_hits.sum(1) / relevant).sum())
        recall_sum += float((hits_so_far[:, min(RECALL_AT, matches.shape[1]) - 1] / relevant).sum())
        counted += int(valid.sum())
    if counted == 0:
        raise DataError(
            "retrieval: no query has a true match in the gallery; each query identity needs gallery samples"
        )
    metrics = {f"rank{k}": 100.0 * float(cmc[i]) / counted for i, k in enumerate(CMC_RANKS)}
    metrics["map"] = 100.0 * ap_sum / counted
    metrics[f"recall{RECALL_AT}"] = 100.0 * recall_sum / counted
    metrics["queries"] = float(counted)
    return metrics


class RetrievalEvaluator(Evaluator):
    """Keeps every embedding and target of the split; ranks them in ``finish``."""

    def __init__(self) -> None:
        self.embeddings: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        if prediction.dim() != 2 or prediction.shape[0] != targets.shape[0]:
            raise DataError(
                f"retrieval: the network's embedding must be B x D, got {tuple(prediction.shape)} for "
                f"{targets.shape[0]} samples"
            )
        self.embeddings.append(F.normalize(prediction.detach().float(), dim=1).cpu())
        self.targets.append(targets.detach().cpu())

    def finish(self, reduce: Reduce | None = None) -> dict[str, float]:
        if not self.embeddings:
            raise DataError("retrieval: the evaluated split is empty")
        embeddings = torch.cat(self.embeddings)
        targets = torch.cat(self.targets)
        if targets.dim() == 1:  # leave-one-out over the whole split
            return retrieval_metrics(embeddings, targets, embeddings, targets, exclude_self=True)
        ids, is_query = targets[:, 0], targets[:, 1].bool()
        if not is_query.any() or is_query.all():
            raise DataError("retrieval: a query/gallery split needs both queries (is_query 1) and gallery rows (0)")
        return retrieval_metrics(embeddings[is_query], ids[is_query], embeddings[~is_query], ids[~is_query])


def embedding_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The embedding a retrieval network is ranked by: ``model.embed(x)``, else its ``pool``
    feature point (kdforge zoo networks), else ``model(x)``."""
    embed = getattr(model, "embed", None)
    if callable(embed):
        return embed(inputs)
    pool = (getattr(model, "feature_points", None) or {}).get("pool")
    if pool:
        captured: list[torch.Tensor] = []
        handle = model.get_submodule(pool).register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            model.forward(inputs)  # the eager forward: a compiled module's graph would skip the hook
        finally:
            handle.remove()
        return captured[-1].flatten(1)
    return model(inputs)


@TASKS.register("retrieval")
class Retrieval(Task):
    """Identity logits for training, embeddings ranked query-vs-gallery for evaluation."""

    name = "retrieval"
    primary = "map"
    higher_is_better = True
    loss_name = "ce"
    shardable = False

    def supervised_loss(self, prediction: torch.Tensor, targets: torch.Tensor, **options: Any) -> torch.Tensor:
        if targets.dim() != 1:
            raise DataError(
                "retrieval: training targets must be N identity indices (query/gallery rows are for evaluation)"
            )
        return F.cross_entropy(prediction, targets, label_smoothing=float(options.get("label_smoothing", 0.0)))

    def evaluator(self) -> Evaluator:
        return RetrievalEvaluator()

    def predict(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return embedding_of(model, inputs)

    def describe(self, metrics: dict[str, float]) -> str:
        if "map" not in metrics:
            return ""
        return f"rank-1 {metrics['rank1']:.2f}% mAP {metrics['map']:.2f}%"

    def check_targets(self, targets: torch.Tensor, count: int, where: str) -> None:
        if targets.dtype != torch.int64 or targets.shape[:1] != (count,) or targets.dim() not in (1, 2):
            raise DataError(
                f"{where}: retrieval targets must be int64 identities ({count},) or (identity, is_query) rows "
                f"({count}, 2), got {targets.dtype} {tuple(targets.shape)}"
            )
