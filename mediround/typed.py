"""One typed loader for every configuration the tool reads: recipes, model configs, inference settings.

Configurations stay plain ``dataclasses`` (``asdict``/``replace`` and JSON round trips keep working);
pydantic v2 checks them: every key and type, nested sections, tuples from YAML lists, numbers written
as strings (PyYAML reads ``1e-3`` as a string). A class opts in with ``@typed_config``, which refuses
unknown keys. ``load_typed`` turns pydantic's error list into the tool's one-line message, naming the
source file and the dotted key, with a "did you mean" hint for a misspelt key.

Every rule on a value is declared with its field, so there is one place to look and one wording:
``Literal`` for a choice, ``Field(ge=..., gt=..., le=..., lt=...)`` for a bound, ``check(rule, reason)``
for anything else, and, for a rule between fields of one section, a ``@model_validator(mode="after")``
that calls ``refuse(key, reason)``. What the loader cannot know (whether a file exists on this machine)
is checked by the caller after loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError, with_config
from pydantic_core import PydanticCustomError

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
# The tool's wording of a bound, by pydantic's error type (its ``ctx`` holds the bound under the same key).
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {bound}"),
    "greater_than": ("gt", "must be greater than {bound}"),
    "less_than_equal": ("le", "must be at most {bound}"),
    "less_than": ("lt", "must be below {bound}"),
}
_RULE = "mediround_rule"
"""pydantic's error type of a ``check`` or ``refuse``: its message is the tool's own reason."""


def typed_config(cls: type[T]) -> type[T]:
    """Mark a dataclass as a checked configuration section: unknown keys are refused."""
    return with_config(ConfigDict(extra="forbid"))(cls)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def check(rule: Callable[[Any], bool], reason: str) -> AfterValidator:
    """A rule on a field's value, declared beside its type (``Annotated[float, check(...)]``): a value
    for which ``rule`` is false is refused with ``reason`` (``{value}`` in it: the value as a file writes it)."""

    def validate(value: Any) -> Any:
        if not rule(value):
            raise PydanticCustomError(_RULE, reason, {"value": _shown(value)})
        return value

    return AfterValidator(validate)


def refuse(key: str, reason: str) -> NoReturn:
    """Refuse a section from its ``@model_validator(mode="after")``: ``key`` is the field of the section
    the message names (a rule between fields names the one to change)."""
    raise PydanticCustomError(_RULE, reason, {"key": key})


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
    kind = problem["type"]
    ctx = problem.get("ctx") or {}
    # A section's own rule names its field in ``ctx`` (pydantic locates it at the section).
    loc = tuple(problem["loc"]) + ((ctx["key"],) if kind == _RULE and "key" in ctx else ())
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
    if kind == _RULE:
        return f"{source}: key '{key}': {problem['msg']}"
    if kind == "literal_error":
        return f"{source}: key '{key}': {_shown(value)!r} is not one of {ctx['expected']}"
    if kind in _BOUNDS:
        name, wording = _BOUNDS[kind]
        bound = ctx[name]
        if bound == 0 and kind in ("greater_than_equal", "greater_than"):
            wording = "must not be negative" if kind == "greater_than_equal" else "must be positive"
        # The value as the field holds it (a float field shows -1 as -1.0), as ``check`` reasons show it.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = type(bound)(value)
        shown_bound = bound if isinstance(bound, int) else f"{bound:g}"
        return f"{source}: key '{key}': {wording.format(bound=shown_bound)}, got {value}"
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected is None:
        return f"{source}: key '{key}': {problem['msg']}, got {value!r}"
    return f"{source}: key '{key}': expected {expected}, got {value!r} ({type(value).__name__})"


def _shown(value: Any) -> Any:
    """A value as a YAML or JSON file writes it: tuples as lists."""
    if isinstance(value, tuple):
        return [_shown(item) for item in value]
    return value


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
