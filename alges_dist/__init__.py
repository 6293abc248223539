"""alges-dist: ALGES active learning for surgical video segmentation, at archive scale."""

__version__ = "0.1.0"
