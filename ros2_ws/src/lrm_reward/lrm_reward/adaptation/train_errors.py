"""The errors of an ``lrm-train-reward`` run; ``train.main`` turns each into its own exit code.

A module of their own because every part of training raises them (base model checks, batches,
checkpoints, the per-modality loop). What it is not: config mistakes, which are ValueErrors
(``train_config``), and missing labels (``samples.LabelError``).
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class BaseModelMismatchError(TrainingError):
    """Adapters or checkpoints that were made for another base model."""


class OutOfMemoryTrainingError(TrainingError):
    """The device ran out of memory; the message suggests a smaller batch with more accumulation."""
