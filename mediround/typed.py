"""One typed loader for every configuration the tool reads: recipes, model configs, inference settings.

Configurations stay plain ``dataclasses`` (``asdict``/``replace`` and JSON round trips keep working);
pydantic v2 checks them: every key and type, nested sections, tuples from YAML lists, numbers written
as strings (PyYAML reads ``1e-3`` as a string). A class opts in with ``@typed_config``, which refuses
unknown keys. ``load_typed`` turns pydantic's error list into the tool's one-line message, naming the
source file and the dotted key, with a "did you mean" hint for a misspelt key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

from mediround.errors import MediRoundError, RecipeError

T = TypeVar("T")

# What a value should have been, by the prefix of pydantic's error type.
_EXPECTED = {
    "int": "an integer",
    "bool": "true/false",
    "float": "a number",
    "string": "a string",
    "tuple": "a list",
    "list": "a list",
    "dict": "a mapping",
    "dataclass": "a mapping",
    "model": "a mapping",
}


def typed_config(cls: type[T]) -> type[T]:
    """Mark a dataclass as a checked configuration section: unknown keys are refused."""
    return with_config(ConfigDict(extra="forbid"))(cls)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def load_typed(cls: type[T], data: Any, source: str, where: str = "",
               error: type[MediRoundError] = RecipeError) -> T:
    """An instance of dataclass ``cls`` from plain data, or ``error`` with one line naming the first problem.

    ``source`` names the file (or other origin) in the message; ``where`` is the dotted key ``data`` sits
    at inside that file (``"model"`` for a recipe's model section), so keys are named as the user wrote them.
    """
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as failure:
        raise error(_one_line(cls, failure.errors()[0], source, where)) from None


def _one_line(cls: type, problem: dict, source: str, where: str) -> str:
    loc = tuple(problem["loc"])
    kind = problem["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        parent = _dotted(where, loc[:-1])
        name = str(loc[-1])
        known = _field_names(cls, loc[:-1])
        close = closest(name, known)
        key = _dotted(parent, (name,))
        if close:
            return f"{source}: unknown key '{key}' (did you mean '{_dotted(parent, (close,))}'?)"
        return f"{source}: unknown key '{key}'; known: {sorted(known)}"
    key = _dotted(where, loc)
    if kind == "missing":
        return f"{source}: key '{key}': missing"
    value = problem.get("input")
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected is None:
        return f"{source}: key '{key}': {problem['msg']}, got {value!r}"
    return f"{source}: key '{key}': expected {expected}, got {value!r} ({type(value).__name__})"


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The known key a typo most likely meant: by similarity, else one that starts the other."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if close:
        return close[0]
    lowered = name.lower()
    prefixed = [c for c in candidates if lowered.startswith(c.lower()) or c.lower().startswith(lowered)]
    return min(prefixed, key=lambda c: abs(len(c) - len(name)), default=None)


def _dotted(prefix: str, loc: tuple) -> str:
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key = f"{key}.{part}" if key else str(part)
    return key


def _field_names(cls: type, loc: tuple) -> list[str]:
    """The field names of the dataclass found by following ``loc`` from ``cls`` (empty if none)."""
    node: Any = cls
    for part in loc:
        if not dataclasses.is_dataclass(node) or isinstance(part, int):
            return []
        node = typing.get_type_hints(node).get(part)
    if not dataclasses.is_dataclass(node):
        return []
    return [f.name for f in dataclasses.fields(node) if f.init]
