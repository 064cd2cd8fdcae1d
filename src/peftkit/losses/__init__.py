"""Losses: pure tensor functions, model/batch objectives, forgetting penalties, adversarial training.

- ``functional``: cross_entropy (ignore index, label smoothing), causal_lm_loss, binary_cross_entropy,
  mse, focal_loss, sigmoid_focal_loss, kl_divergence, distillation_kl, symmetric_kl;
- ``objectives``: ``RDropLoss``, ``DistillationLoss`` (``loss_fn(model, batch)`` for the Trainer);
- ``regularizers``: ``L2SP``, ``EWC`` (``penalty(model)`` for ``Trainer(regularizers=[...])``);
- ``adversarial``: ``EmbeddingAttack`` (FGM / PGD on input embeddings; ``TrainConfig(adversarial=)``).
"""

from .adversarial import EmbeddingAttack, find_input_embedding
from .functional import (
    IGNORE_INDEX,
    binary_cross_entropy,
    causal_lm_loss,
    cross_entropy,
    distillation_kl,
    focal_loss,
    kl_divergence,
    mse,
    sigmoid_focal_loss,
    symmetric_kl,
)
from .objectives import DistillationLoss, RDropLoss
from .regularizers import EWC, L2SP

__all__ = [
    "EWC",
    "IGNORE_INDEX",
    "L2SP",
    "DistillationLoss",
    "EmbeddingAttack",
    "RDropLoss",
    "binary_cross_entropy",
    "causal_lm_loss",
    "cross_entropy",
    "distillation_kl",
    "find_input_embedding",
    "focal_loss",
    "kl_divergence",
    "mse",
    "sigmoid_focal_loss",
    "symmetric_kl",
]
