"""LightningModules for the benchmark tasks and the ``ssn-bench`` command line."""

from .base import NormTask
from .classification import ImageClassifier
from .segmentation import SemanticSegmenter
from .video import VideoClassifier

__all__ = ["ImageClassifier", "NormTask", "SemanticSegmenter", "VideoClassifier"]
