"""Converters from published checkpoint layouts into the layouts MediRound loads."""

from mediround.convert.llava import ConvertLlavaConfig, LlavaConversionReport, convert_llava

__all__ = ["ConvertLlavaConfig", "LlavaConversionReport", "convert_llava"]
