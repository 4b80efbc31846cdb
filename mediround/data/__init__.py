"""Dialogues: the data model, on-disk formats, images and masks, validation, the synthetic benchmark."""

from mediround.data.dialogue import Dialogue, Round

__all__ = ["Dialogue", "Round"]
