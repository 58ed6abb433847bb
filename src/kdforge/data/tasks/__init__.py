"""What a dataset asks a network to predict, and how a prediction is scored: the ``TASKS`` registry.

A :class:`Task` gives the supervised loss on the labels, an :class:`Evaluator` that turns a split's
predictions into metrics, and the metric that selects the best epoch (with its direction). The
trainer, ``kdforge eval`` and every method reach the task through ``DatasetInfo.task``, so a new
kind of target (per-pixel labels, embeddings, ...) is a new file here, not a change to the loop.

Registered: ``classification`` (top-1, top-5, cross-entropy), ``regression`` (MAE, RMSE, MSE) and
``retrieval`` (rank-1/CMC, mAP, recall@10 of embeddings, query vs gallery).
"""

from kdforge.data.tasks import classification, regression, retrieval  # noqa: F401  (registers them)
from kdforge.data.tasks.base import TASKS, Evaluator, Task, task_for

__all__ = ["TASKS", "Evaluator", "Task", "task_for"]
