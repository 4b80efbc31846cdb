"""MediRound: multi-round, entity-level reasoning segmentation of medical images."""

__version__ = "0.1.0"
