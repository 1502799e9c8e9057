"""The machinery behind the job spec's fields: :class:`Option` (how a field crosses the CLI and the HTTP API, its
bounds and help) and the checks every spec part runs in ``__post_init__``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from bitplan.errors import SpecError


@dataclass(frozen=True)
class Option:
    """How one spec field crosses the boundaries. ``kind``: int, float, bool, str, enum, ints, floats, pins."""

    kind: str
    help: str
    flag: str | None = None  # command-line flag; None: not on the command line
    http: bool = True  # a field of the HTTP job schema
    name: str = ""  # flat name (HTTP field); filled from the field name when empty
    minimum: float | None = None  # inclusive bounds (of every element, for lists)
    maximum: float | None = None
    positive: bool = False  # must be > 0 (and finite)
    label: str = ""  # how messages name it (default: the flat name)
    choices: type[Enum] | None = None
    group: str | None = None  # mutually exclusive flags (the budget)
    max_items: int | None = None
    part: str = ""  # filled by _collect: the JobSpec attribute holding the field ("" for the model)
    field: str = ""
    default: Any = None


def option_field(default: Any, kind: str, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"option": Option(kind=kind, help=help, **kwargs)})


def check_part(part: Any) -> None:
    """Coerce choices and lists, and check every field of ``part`` against its option's bounds."""
    for f in fields(part):
        option: Option | None = f.metadata.get("option")
        if option is None:
            continue
        value = getattr(part, f.name)
        name = option.name or f.name
        if option.kind == "str" and hasattr(value, "__fspath__"):
            value = str(value)
        if option.kind == "enum" and value is not None:
            value = _choice(option.choices, value, name)
        elif option.kind in ("ints", "floats", "pins"):
            value = tuple(tuple(v) if option.kind == "pins" else v for v in value)
        object.__setattr__(part, f.name, value)
        _check_value(option, name, option.label or name, value)


def _choice(choices: Any, value: Any, name: str) -> Enum:
    try:
        return choices(value)
    except ValueError:
        raise SpecError(f"unknown {name} {value!r}; choose one of {', '.join(c.value for c in choices)}",
                        param=name) from None


def _check_value(option: Option, name: str, label: str, value: Any) -> None:
    if value is None or option.kind == "enum":
        return
    if option.kind in ("str", "bool"):
        if not isinstance(value, str if option.kind == "str" else bool):
            raise SpecError(f"{name} takes a {'string' if option.kind == 'str' else 'boolean'}, got {value!r}",
                            param=name)
        return
    if option.kind == "pins":
        for pattern, bits in value:
            if not pattern or not isinstance(bits, int):
                raise SpecError(f"{name} takes PATTERN=BITS pairs such as 'model.layers.0.*=8', got "
                                f"{pattern!r}={bits!r}", param=name)
        return
    items = value if option.kind in ("ints", "floats") else (value,)
    number = int if option.kind in ("int", "ints") else (int, float)
    if any(isinstance(item, bool) or not isinstance(item, number) for item in items):
        raise SpecError(f"{name} takes {'integers' if number is int else 'numbers'}, got {value!r}", param=name)
    if option.max_items is not None and len(items) > option.max_items:
        raise SpecError(f"{name} takes at most {option.max_items} values, got {len(items)}", param=name)
    for item in items:
        _check_number(option, name, label, item)


def _check_number(option: Option, name: str, label: str, item: float) -> None:
    finite = not isinstance(item, float) or math.isfinite(item)
    if option.positive and (item <= 0 or not finite):
        rule = "a positive finite number" if isinstance(item, float) or option.kind == "floats" else "positive"
        raise SpecError(f"{label} must be {rule}, got {item}", param=name)
    if not finite:
        raise SpecError(f"{label} must be a finite number, got {item}", param=name)
    low, high = option.minimum, option.maximum
    if (low is not None and item < low) or (high is not None and item > high):
        bounds = f"at most {high:g}" if low is None else f"between {low:g} and {high:g}"
        raise SpecError(f"{label} must be {bounds}, got {item}", param=name)
