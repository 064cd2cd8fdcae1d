"""From a batch to a loss, and to predictions for metrics: the Trainer's default loss.

The code lives in ``peftkit.losses.tasks`` (beside the pure loss functions it is built on and the
objectives built on it, so the losses package imports nothing of the training loop); this module
keeps the names importable from here.
"""

from __future__ import annotations

from ..losses.tasks import Forward as Forward
from ..losses.tasks import TaskLoss as TaskLoss
from ..losses.tasks import check_labels as check_labels
from ..losses.tasks import forward as forward
from ..losses.tasks import predictions as predictions
from ..losses.tasks import read_output as read_output
from ..losses.tasks import resolve_task as resolve_task
from ..losses.tasks import split_batch as split_batch
from ..losses.tasks import task_loss as task_loss
