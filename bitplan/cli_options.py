"""Command-line flags generated from the job spec's options (:data:`bitplan.spec.OPTIONS`), and the spec read
back from parsed arguments: a flag is never written by hand, so every job option reaches ``run`` and ``submit``
with the spec's default and help."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from bitplan.spec import OPTIONS, JobSpec, Option


def _numbers(cast: Callable[[str], Any], flag: str, example: str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(cast(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a number or comma-separated numbers such as {example}, "
                                             f"got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("needs at least one number")
        return values

    return parse


def _default_text(option: Option) -> str:
    default = option.default
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default) if default else "none"
    return str(getattr(default, "value", default))


def _argument(option: Option) -> dict[str, Any]:
    """argparse keywords for one option (unset flags stay ``None``, so the spec's default applies)."""
    shown = "" if option.group or option.default is None else f" (default: {_default_text(option)})"
    metavar = (option.flag or option.name).lstrip("-").upper().replace("-", "_")
    kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": option.help + shown, "metavar": metavar}
    if option.kind == "bool":
        return {**{k: v for k, v in kwargs.items() if k != "metavar"}, "action": "store_true"}
    if option.kind == "pins":
        return {**kwargs, "action": "append", "metavar": "PATTERN=BITS"}
    flag = option.flag or option.name
    types: dict[str, Any] = {"int": int, "float": float, "str": str, "enum": str,
                             "ints": _numbers(int, flag, "2,3,4,8"), "floats": _numbers(float, flag, "3,3.5,4")}
    kwargs["type"] = types[option.kind]
    if option.kind in ("ints", "floats"):
        kwargs["metavar"] = f"{metavar}[,{metavar}...]"
    if option.kind == "enum" and option.choices is not None:  # checked by the spec, with the API's message
        kwargs["metavar"] = "{" + ",".join(c.value for c in option.choices) + "}"
    return kwargs


def add_spec_arguments(parser: argparse.ArgumentParser, *, only: Iterable[str] | None = None,
                       http_only: bool = False) -> None:
    """Add a flag for every spec option (``only``: these flat names; ``http_only``: those a job request takes).
    The size budget's flags are mutually exclusive; which budgets a job needs the spec says (a latency budget may
    stand alone)."""
    wanted = set(only) if only is not None else None
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        if option.flag is None or (wanted is not None and option.name not in wanted):
            continue
        if http_only and not option.http:
            continue
        target: Any = parser
        if option.group is not None:
            if option.group not in groups:
                groups[option.group] = parser.add_mutually_exclusive_group()
            target = groups[option.group]
        kwargs = _argument(option)
        if option.name == "model":
            kwargs.update(required=True, type=str)
        target.add_argument(option.flag, **kwargs)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The spec options set on the command line, by flat name."""
    values = {}
    for option in OPTIONS:
        value = getattr(args, option.name, None)
        if value is not None and value is not False:
            values[option.name] = value
    return values


def spec_from_args(args: argparse.Namespace, **extra: Any) -> JobSpec:
    """The job spec the command line describes (``extra``: options the command fixes itself)."""
    return JobSpec.from_flat(**{**given_options(args), **extra})
