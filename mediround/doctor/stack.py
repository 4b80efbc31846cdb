"""Stack and hardware checks: package versions against pyproject's ranges, torchvision, GPUs, bf16."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import re
from dataclasses import dataclass

from mediround.doctor.checks import FAIL, OK, WARN, CheckResult

STACK = ("torch", "transformers", "peft", "accelerate", "segment-anything", "safetensors", "tokenizers")
PROJECT = "mediround"
GIB = 1024**3
_COMPARE = {
    ">=": lambda v, r: v >= r,
    "<=": lambda v, r: v <= r,
    ">": lambda v, r: v > r,
    "<": lambda v, r: v < r,
    "==": lambda v, r: v == r,
    "!=": lambda v, r: v != r,
}


@dataclass(frozen=True)
class GpuInfo:
    """One visible CUDA device."""

    index: int
    name: str
    memory_bytes: int


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: ``2.13.0+cpu`` -> (2, 13, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def in_range(version: str, specifier: str) -> bool:
    """Whether ``version`` satisfies a comma-separated specifier such as ``>=5.0,<6`` (``~=`` as ``>=``)."""
    have = version_tuple(version)
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        match = re.match(r"(~=|>=|<=|==|!=|>|<)\s*(.+)", clause)
        if match is None:
            continue
        operator, wanted = match.group(1), version_tuple(match.group(2))
        width = max(len(have), len(wanted))
        padded_have, padded_wanted = have + (0,) * (width - len(have)), wanted + (0,) * (width - len(wanted))
        if not _COMPARE.get(operator, _COMPARE[">="])(padded_have, padded_wanted):
            return False
    return True


def tested_ranges() -> dict[str, str]:
    """The version range of each dependency as the installed project declares it (from pyproject)."""
    ranges = {"python": importlib.metadata.metadata(PROJECT).get("Requires-Python") or ""}
    for requirement in importlib.metadata.requires(PROJECT) or []:
        if ";" in requirement:
            continue
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement)
        if match:
            ranges[_normalise(match.group(1))] = match.group(2).strip()
    return ranges


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_versions() -> list[CheckResult]:
    """Python and each stack package: installed version within the tested range (warn outside)."""
    ranges = tested_ranges()
    rows = [_version_row("python", platform.python_version(), ranges.get("python", ""))]
    for package in STACK:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            rows.append(CheckResult(package, FAIL, f"not installed (pip install '{package}{ranges.get(package, '')}')"))
            continue
        rows.append(_version_row(package, version, ranges.get(_normalise(package), "")))
    return rows


def _version_row(name: str, version: str, specifier: str) -> CheckResult:
    if not specifier:
        return CheckResult(name, OK, version)
    if in_range(version, specifier):
        return CheckResult(name, OK, f"{version} (tested {specifier})")
    return CheckResult(name, WARN, f"{version} is outside the tested range {specifier}")


def check_torchvision() -> CheckResult:
    """segment_anything's package ``__init__`` imports torchvision; MediRound imports the model classes
    without it, so a missing or broken torchvision is a warning, not a failure."""
    try:
        module = importlib.import_module("torchvision")
    except ImportError:
        return CheckResult("torchvision", WARN, "not installed; MediRound imports SAM's model classes without it")
    except (RuntimeError, AttributeError, OSError) as error:  # a CUDA torchvision beside a CPU torch
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return CheckResult(
            "torchvision", WARN, f"import fails ({first}); MediRound imports SAM's model classes without it"
        )
    return CheckResult("torchvision", OK, str(getattr(module, "__version__", "importable")))


def visible_gpus() -> list[GpuInfo]:
    """The CUDA devices torch sees (none on a CPU-only machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index, properties.name, int(properties.total_memory)))
    return gpus


def check_gpus(gpus: list[GpuInfo]) -> CheckResult:
    """One row listing the GPUs and their memory; a CPU-only machine is a warning."""
    if not gpus:
        return CheckResult("GPUs", WARN, "no GPU (torch.cuda is not available): training would run on CPU")
    listed = "; ".join(f"{gpu.index}: {gpu.name}, {gpu.memory_bytes / GIB:.1f} GiB" for gpu in gpus)
    return CheckResult("GPUs", OK, f"{len(gpus)} x [{listed}]")


def check_bf16(gpus: list[GpuInfo], needs_bf16: bool | None) -> CheckResult:
    """bf16 support of the GPUs; ``needs_bf16`` is whether the recipe asks for it (None: no recipe)."""
    import torch

    if not gpus and needs_bf16 is False:
        return CheckResult("bf16", OK, "not needed (the recipe does not use bf16)")
    if not gpus:
        return CheckResult("bf16", WARN, "no GPU to check bf16 on" + ("; the recipe asks for bf16" if needs_bf16 else ""))
    if torch.cuda.is_bf16_supported():
        return CheckResult("bf16", OK, "supported")
    if needs_bf16:
        return CheckResult(
            "bf16", FAIL, "not supported by this GPU but the recipe asks for bf16: set model.precision=fp32 "
            "and train.mixed_precision=fp16 or no"
        )
    return CheckResult("bf16", WARN, "not supported by this GPU")
