"""Typed config dataclasses: field constraints as dataclass metadata, values coerced to their
annotated types (choices parsed from their words), every failure a ConfigError naming the field
(``section.key``). The configs themselves are in ``config.py``."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, ClassVar, Mapping

from regionspot_cache.choices import Choice
from regionspot_cache.errors import ConfigError


# Field constraints, as dataclass field metadata read by ``Validated.validate``: every numeric
# field of every config carries one (a test checks it), so no zero or negative count slips through.
def at_least(low: float) -> dict[str, Any]:
    return {"min": low}


def above(low: float) -> dict[str, Any]:
    return {"above": low}


def between(low: float, high: float) -> dict[str, Any]:
    return {"min": low, "max": high}


def one_of(*choices: Any) -> dict[str, Any]:
    return {"choices": choices}


DEVICE = {"device": True}  # "auto", "cpu", "mps", "cuda" or "cuda:N"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class Validated:
    """A config dataclass that checks its fields' types and metadata constraints, then its
    relations (``check_relations``), on construction and whenever ``validate`` is called again
    (``--set`` and the command-line options assign fields after __init__)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            where = f"{self.SECTION}.{item.name}"
            value = getattr(self, item.name)
            if dataclasses.is_dataclass(value) and isinstance(value, Validated):
                value.validate()
                continue
            value = coerce(value, hints[item.name], where)
            setattr(self, item.name, value)
            for index, one in enumerate(value if isinstance(value, list) else [value]):
                _check_constraints(one, item.metadata, f"{where}[{index}]" if isinstance(value, list) else where)
        self.check_relations()

    def check_relations(self) -> None:
        """Constraints between fields; none by default."""


def _check_constraints(value: Any, rules: Mapping[str, Any], where: str) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, rules['choices']))}")
    if "min" in rules and value < rules["min"]:
        raise ConfigError(f"{where}: {value} must be at least {rules['min']}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"{where}: {value} must be at most {rules['max']}")
    if "above" in rules and value <= rules["above"]:
        raise ConfigError(f"{where}: {value} must be greater than {rules['above']}")
    if rules.get("device") and not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"{where}: {value!r} is not a device; expected auto, cpu, mps, cuda or cuda:N")


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from nested dicts; ``where`` names the source in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = coerce(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {value!r} is not a list")
        return [coerce(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is type(None):
            continue
        if isinstance(kind, type) and issubclass(kind, Choice) and isinstance(value, str):
            return _choice(kind, value, where)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
    raise ConfigError(f"{where}: {value!r} is not {_type_name(hint)}")


def _choice(kind: type[Choice], word: str, where: str) -> Choice:
    found = kind.find(word)
    if found is None:
        raise ConfigError(f"{where}: {word!r} is not one of {', '.join(kind.words())}")
    return found


def _type_name(hint: Any) -> str:
    kinds = typing.get_args(hint) or (hint,)
    # A choice is written as a word: "is not a str", as before choices were objects.
    names = [
        "str" if isinstance(kind, type) and issubclass(kind, Choice) else getattr(kind, "__name__", str(kind)) for kind in kinds
    ]
    text = " or ".join("none" if name == "NoneType" else name for name in names)
    return ("an " if text[0] in "aeiou" else "a ") + text
