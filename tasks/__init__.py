"""LightningModules for the benchmark tasks and the ``ssn-bench`` command line."""

from .base import NormTask
from .classification import ImageClassifier

__all__ = ["ImageClassifier", "NormTask"]
