"""Reading the JSON form of a `PermutationSpec` (`PermutationSpec.from_dict`): every field is
checked for its type, and a malformed one raises `SpecError` naming it (``groups[0].size``)."""

from __future__ import annotations

from typing import Any

from .errors import SpecError
from .spec import Axis, Frozen, PermGroup

__all__ = ["parse_fields"]

_MISSING = object()
_AXIS = {"tensor": (str, _MISSING), "dim": (int, _MISSING), "offset": (int, 0), "outer": (int, 1), "inner": (int, 1)}
_FROZEN = {"tensor": (str, _MISSING), "dim": (int, _MISSING), "size": (int, _MISSING), "reason": (str, _MISSING),
           "offset": (int, 0), "outer": (int, 1), "inner": (int, 1)}
_KINDS = {int: "an integer", str: "a string", list: "a list", dict: "an object", type(None): "null"}


def parse_fields(data: dict[str, Any]) -> tuple[list[PermGroup], list[Frozen], dict, dict, dict]:
    """Groups, frozen entries, shapes, tied names and meta of a spec dict whose format and
    version were checked."""
    groups = []
    for i, g in enumerate(_get(data, "groups", list, "groups")):
        where = f"groups[{i}]"
        axes = [Axis(**_entry(a, _AXIS, f"{where}.axes[{j}]")) for j, a in enumerate(_get(g, "axes", list, f"{where}.axes"))]
        groups.append(PermGroup(_get(g, "name", str, f"{where}.name"), _get(g, "size", int, f"{where}.size"), axes,
                                _get(g, "parent", (str, type(None)), f"{where}.parent", None)))
    frozen = [Frozen(**_entry(f, _FROZEN, f"frozen[{i}]")) for i, f in enumerate(_get(data, "frozen", list, "frozen", []))]
    shapes = {k: tuple(_check(s, int, f"shapes[{k!r}][{d}]") for d, s in enumerate(_get(v, None, list, f"shapes[{k!r}]")))
              for k, v in _get(data, "shapes", dict, "shapes", {}).items()}
    tied = {k: [_check(a, str, f"tied[{k!r}][{j}]") for j, a in enumerate(_get(v, None, list, f"tied[{k!r}]"))]
            for k, v in _get(data, "tied", dict, "tied", {}).items()}
    return groups, frozen, shapes, tied, dict(_get(data, "meta", dict, "meta", {}))


def _check(value: Any, types: Any, name: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        kinds = types if isinstance(types, tuple) else (types,)
        raise SpecError(f"malformed spec JSON: field {name} must be {' or '.join(_KINDS[t] for t in kinds)}, "
                        f"got {value!r} (write specs with PermutationSpec.save)")
    return value


def _get(obj: Any, key: str | None, types: Any, name: str, default: Any = _MISSING) -> Any:
    """``obj[key]`` checked against ``types`` (``obj`` itself when ``key`` is None); `SpecError`
    naming ``name`` when it is missing (without a default) or of another type."""
    if key is None:
        return _check(obj, types, name)
    if not isinstance(obj, dict):
        raise SpecError(f"malformed spec JSON: {name.rsplit('.', 1)[0]} must be an object, got {obj!r}")
    if key not in obj:
        if default is _MISSING:
            raise SpecError(f"malformed spec JSON: field {name} is missing")
        return default
    return _check(obj[key], types, name)


def _entry(obj: Any, fields: dict[str, tuple[Any, Any]], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SpecError(f"malformed spec JSON: {where} must be an object, got {obj!r}")
    if set(obj) - set(fields):
        raise SpecError(f"malformed spec JSON: {where} has unknown fields {sorted(set(obj) - set(fields))}")
    return {k: _get(obj, k, t, f"{where}.{k}", d) for k, (t, d) in fields.items()}
