"""``build-dialogues``: multi-round referring dialogues from labelled segmentation data (2-D folders,
nnU-Net NIfTI volumes, DICOM series). See docs/formats.md, "Build your own data"."""

from mediround.data.build.shards import BuildOptions, BuildSummary, build, merge, split_of
from mediround.data.build.sources import KINDS, SliceOptions, detect_kind
from mediround.data.build.volumes import SliceRule

__all__ = ["KINDS", "BuildOptions", "BuildSummary", "SliceOptions", "SliceRule", "build", "detect_kind", "merge", "split_of"]
