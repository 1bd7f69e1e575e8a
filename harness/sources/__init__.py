"""Model sources: the built-in source plugins and the data type they build.

``effnet`` (:mod:`harness.sources.effnet`, the embedded default) and ``tiny-clip``
(:mod:`harness.sources.tiny_clip`) are cached zoos (:mod:`harness.sources.cache`); ``open_clip``
(:mod:`harness.sources.open_clip`) loads your own model and checkpoints. Every source builds a
:class:`~harness.sources.base.ModelSource`.
"""
from harness.sources.base import ModelSource

__all__ = ["ModelSource"]
