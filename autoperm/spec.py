"""The output IR: `Axis`, `PermGroup`, `Frozen` and `PermutationSpec`.

A *group* is one permutation of ``size`` hidden units. Each place where the group touches a
tensor of the model's ``state_dict`` is an `Axis`. An axis moves a *block* of slots of one dim:
the ``outer * size * inner`` slots starting at ``offset``, viewed as ``(outer, size, inner)``;
the group permutes the middle factor. That one layout expresses

* a whole dim: ``Axis("fc1.weight", 0)``;
* the channel atom of a flattened ``C*H*W`` input: ``Axis("fc.weight", 1, inner=H*W)``;
* a slice of a concatenation: ``Axis("fc.weight", 1, offset=32)`` (and ``size`` 16, say);
* timm-style fused ``(3, heads, head_dim)`` projections: ``Axis("qkv.weight", 0, outer=3,
  inner=head_dim)`` for the heads group.

Slots that may not move are listed in `PermutationSpec.frozen`, each with a reason.
A permutation ``p`` acts by gather: ``new[i] = old[p[i]]`` along the group's slots.

Worked example, the spec of ``Sequential(Linear(4, 8), ReLU(), Linear(8, 3))``::

    group "0" (size 8): 0.weight dim 0, 0.bias dim 0, 2.weight dim 1
    frozen: 0.weight dim 1 (model input), 2.weight dim 0 and 2.bias dim 0 (model output)

*Hierarchical groups*: a group with a ``parent`` (each attention head's head_dim, parent: the
heads) may take one permutation per parent slot: an ``[parent.size, size]`` tensor, row ``h``
acting on the units of parent slot ``h``, applied after the parent's permutation (so row ``h``
belongs to the head now at position ``h``). On each child axis, outer index ``k`` lies in parent
slot ``k // (outer / parent.size)``. A 1-D permutation of a child acts on every parent slot alike.
`autoperm.trace(..., hierarchical=True)` emits them where the graph proves it
(`autoperm.hierarchy`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .errors import ShapeMismatchError, SpecError

__all__ = ["Axis", "Frozen", "PermGroup", "PermutationSpec", "FORMAT_VERSION", "state_of", "strip_location"]

FORMAT_VERSION = 1
_FORMAT_NAME = "autoperm.PermutationSpec"


@dataclass(frozen=True)
class Axis:
    """Where a group acts: slots ``offset .. offset + outer*size*inner`` of ``tensor``'s ``dim``,
    viewed as ``(outer, size, inner)``; the group permutes the middle factor.

    Example: ``Axis("fc.weight", 1, inner=16)`` for a 4-channel ``(4, 4, 4)`` map flattened into
    ``fc``: each channel is a block of 16 consecutive input features.
    """

    tensor: str
    dim: int
    offset: int = 0
    outer: int = 1
    inner: int = 1

    def extent(self, size: int) -> int:
        """Number of slots of ``dim`` this axis covers, for a group of ``size``."""
        return self.outer * size * self.inner

    def describe(self, size: int, length: int | None = None) -> str:
        """Short layout text: ``""`` when the axis covers the whole dim of ``length`` slots one unit
        per slot, else ``"[offset:end] as (outer,size,inner)"`` (always, without ``length``)."""
        end = self.offset + self.extent(size)
        if self.offset == 0 and self.outer == 1 and self.inner == 1 and length == end:
            return ""
        return f"[{self.offset}:{end}] as ({self.outer},{size},{self.inner})"


@dataclass(frozen=True)
class Frozen:
    """Slots of a tensor dim that no permutation may move, and why (same layout as `Axis`)."""

    tensor: str
    dim: int
    size: int
    reason: str
    offset: int = 0
    outer: int = 1
    inner: int = 1

    def extent(self) -> int:
        return self.outer * self.size * self.inner


@dataclass
class PermGroup:
    """One permutation of ``size`` units and every place (`Axis`) it acts on.

    ``parent`` names the group whose slots may each take their own permutation of this group
    (hierarchical groups, see the module docstring); ``None`` for a plain group.
    """

    name: str
    size: int
    axes: list[Axis] = field(default_factory=list)
    parent: str | None = None


@dataclass
class PermutationSpec:
    """The permutation symmetries of a model, as compiled by `autoperm.trace`.

    ``groups`` are the permutable hidden-unit groups; ``frozen`` the parameter slots that must
    stay in place, each with a reason; ``shapes`` the shape of every state_dict tensor the spec
    was compiled against; ``tied`` maps a canonical tensor name to the other names of the same
    storage (tied weights), which `permute` keeps identical.
    """

    groups: list[PermGroup]
    frozen: list[Frozen] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- access
    def group(self, name: str) -> PermGroup:
        """The group called ``name`` (raises `SpecError` naming the known groups otherwise)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise SpecError(f"no group named {name!r}; groups are {[g.name for g in self.groups]}")

    def axes_of(self, tensor: str) -> list[tuple[PermGroup, Axis]]:
        """Every (group, axis) pair acting on ``tensor``."""
        return [(g, a) for g in self.groups for a in g.axes if a.tensor == tensor]

    def frozen_of(self, tensor: str) -> list[Frozen]:
        return [f for f in self.frozen if f.tensor == tensor]

    def frozen_reasons(self, locations: bool = True) -> dict[str, int]:
        """How many frozen entries each reason accounts for; with ``locations=False`` reasons
        that differ only in where they arose (the rules' ``"... at layer (file.py:88)"``) count
        as one, e.g. ``{"convolution window (spatial dims)": 118}`` on densenet121."""
        counts: dict[str, int] = {}
        for f in self.frozen:
            why = f.reason if locations else strip_location(f.reason)
            counts[why] = counts.get(why, 0) + 1
        return counts

    # ----------------------------------------------------------------- checks
    def validate(self) -> "PermutationSpec":
        """Check the invariants; raise `SpecError` naming the first violation; return ``self``.

        Per group: a unique name, ``size >= 1``; a parent is another group without a parent, and
        each child axis's outer chunks fall in the parent's slots (`_check_child`). Per axis and
        frozen entry: the tensor is known, the dim exists, the block fits in the dim. Per slot
        and factor: no two entries (axes of any groups, or an axis and a frozen entry) move the
        same slots along overlapping factors. Several groups may share a dim when they act on
        different slots (cat slices) or on different factors (a flattened ``C x H*W``).
        """
        names = [g.name for g in self.groups]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SpecError(f"group names must be unique; repeated: {sorted(dup)}")
        entries: dict[tuple[str, int], list[tuple[str, int, int, int, int]]] = {}
        for g in self.groups:
            if g.size < 1:
                raise SpecError(f"group {g.name!r} has size {g.size}; sizes must be >= 1")
            if g.parent is not None:
                self._check_child(g)
            for a in g.axes:
                self._check_block(f"group {g.name!r}", a.tensor, a.dim, a.offset, a.extent(g.size))
                entries.setdefault((a.tensor, a.dim), []).append(
                    (f"group {g.name!r}", a.offset, a.outer, g.size, a.inner))
        for f in self.frozen:
            self._check_block(f"frozen entry ({f.reason})", f.tensor, f.dim, f.offset, f.extent())
            entries.setdefault((f.tensor, f.dim), []).append(
                (f"frozen ({f.reason})", f.offset, f.outer, f.size, f.inner))
        for (tensor, dim), items in entries.items():
            _check_overlaps(tensor, dim, items)
        aliases = {a for names_ in self.tied.values() for a in names_}
        for g in self.groups:
            for a in g.axes:
                if a.tensor in aliases:
                    raise SpecError(f"group {g.name!r} names tied alias {a.tensor!r}; use its canonical name")
        return self

    def _check_child(self, g: PermGroup) -> None:
        parent = next((p for p in self.groups if p.name == g.parent), None)
        if parent is None or parent is g or parent.parent is not None:
            raise SpecError(f"group {g.name!r} names parent {g.parent!r}, which is not a group without a parent")
        for a in g.axes:
            if a.outer % parent.size:
                raise SpecError(f"child group {g.name!r}: outer {a.outer} on {a.tensor!r} dim {a.dim} is not a "
                                f"multiple of parent {parent.name!r}'s size {parent.size}")
            coord = slot_coordinates([(p.offset, p.outer, p.inner) for p in parent.axes
                                      if p.tensor == a.tensor and p.dim == a.dim], parent.size,
                                     a.offset + a.extent(g.size))
            if not chunks_by_parent(coord, a.offset, a.outer, g.size, a.inner, parent.size):
                raise SpecError(f"child group {g.name!r}: its slots on {a.tensor!r} dim {a.dim} do not lie in "
                                f"parent {parent.name!r}'s slots chunk by chunk")

    def _check_block(self, who: str, tensor: str, dim: int, offset: int, extent: int) -> None:
        if self.shapes and tensor not in self.shapes:
            raise SpecError(f"{who} names tensor {tensor!r}, which is not in the spec's shapes")
        if not self.shapes:
            return
        shape = self.shapes[tensor]
        if not 0 <= dim < len(shape):
            raise SpecError(f"{who}: {tensor!r} has {len(shape)} dims, no dim {dim}")
        if offset < 0 or offset + extent > shape[dim]:
            raise SpecError(f"{who}: slots {offset}:{offset + extent} do not fit dim {dim} of "
                            f"{tensor!r} (size {shape[dim]})")

    def check_model(self, state_dict: Any) -> None:
        """Check that ``state_dict`` (or an ``nn.Module``) is the model the spec was compiled for.

        Raise `ShapeMismatchError` naming the first tensor of the spec that the model lacks or
        holds with another shape, or the first tensor of the model (parameter or persistent
        buffer) that the spec does not know: a permutation of a spec compiled for another model
        (a ResNet-18 spec on a ResNet-34) would leave that tensor in place and change the
        function. That last check applies to a compiled spec (``meta`` records its frontend) and to
        tensors with a dim of 2 or more (a step counter cannot be permuted); a spec written by
        hand is checked on its own ``shapes`` only.
        """
        state = state_of(state_dict, "check_model(state_dict=...)")
        for name, shape in self.shapes.items():
            if name not in state:
                raise ShapeMismatchError(f"the spec names tensor {name!r}, which the model lacks: the spec was "
                                         "compiled for another model; trace this one with autoperm.trace")
            got = tuple(state[name].shape)
            if got != tuple(shape):
                raise ShapeMismatchError(
                    f"tensor {name!r} has shape {list(got)} in the model but {list(shape)} in the spec: the spec "
                    "was compiled for another model; trace this one with autoperm.trace")
        if not self.shapes or "frontend" not in self.meta:  # a hand-written spec may list its own tensors only
            return
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and name not in self.shapes and max(value.shape, default=1) >= 2:
                raise ShapeMismatchError(
                    f"the model has tensor {name!r}, which the spec does not know: the spec was compiled for "
                    "another model, and permuting with it would leave that tensor in place and change the "
                    "model's function; trace this model with autoperm.trace(model, example_inputs)")

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a format name and version (no pickle)."""
        return {
            "format": _FORMAT_NAME,
            "version": FORMAT_VERSION,
            "groups": [{"name": g.name, "size": g.size, "parent": g.parent,
                        "axes": [asdict(a) for a in g.axes]} for g in self.groups],
            "frozen": [asdict(f) for f in self.frozen],
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "tied": {k: list(v) for k, v in self.tied.items()},
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PermutationSpec":
        """The spec of a `to_dict` dict; `SpecError` naming the first malformed field."""
        if not isinstance(data, dict):
            raise SpecError(f"not an autoperm spec: the JSON holds {type(data).__name__}, not an object "
                            "with a 'format' field (write specs with PermutationSpec.save)")
        if data.get("format") != _FORMAT_NAME:
            raise SpecError(f"not an autoperm spec (format field is {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise SpecError(f"spec format version {data.get('version')!r} is not supported; "
                            f"this autoperm reads version {FORMAT_VERSION}")
        from ._spec_json import parse_fields

        groups, frozen, shapes, tied, meta = parse_fields(data)
        spec = cls(groups, frozen, shapes, tied, meta)
        return spec.validate()

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "PermutationSpec":
        """Read a spec written by `save`; with ``model`` (an ``nn.Module`` or a state_dict),
        check that it is the model the spec was compiled for (`check_model`): `ShapeMismatchError`
        names the first tensor that is missing, shaped otherwise or unknown to the spec."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON ({e})") from e
        state = state_of(model, "PermutationSpec.load(model=...)") if model is not None else None  # a wrong type before reading
        spec = cls.from_dict(data)
        if state is not None:
            spec.check_model(state)
        return spec

    # ----------------------------------------------------------------- views
    def table(self) -> str:
        """A printable per-tensor table: key, shape and the group on each dim."""
        from .viz import format_table

        return format_table(self)

    def to_networkx(self):  # -> networkx.Graph
        """The spec as a networkx graph (group and tensor nodes, one edge per axis)."""
        from .viz import to_networkx

        return to_networkx(self)

    def to_dot(self):  # -> pydot.Dot
        """The spec as a pydot graph, one colour per group; frozen dims listed on tensors."""
        from .viz import to_dot

        return to_dot(self)

    def __repr__(self) -> str:
        return (f"PermutationSpec({len(self.groups)} groups, {len(self.frozen)} frozen entries, "
                f"{len(self.shapes)} tensors)")


# the location `autoperm.analysis` and the rules append to a reason (`frontend.node_origin`):
# " at layer1.0 (model.py:88)", " at (model.py:88)", or a module path alone (" at layer1.0", " at <root>")
_LOCATION = re.compile(r" at (?:(?:(?! at ).)*?\([^()\s]+:(?:\d+|\?)\)|<root>|[\w\[\]']+(?:\.[\w\[\]']+)+)$")


def strip_location(reason: str) -> str:
    """``reason`` without the location suffix the analysis appends (``" at layer1.0 (model.py:88)"``);
    any other text, ``" at "`` included, is kept."""
    return _LOCATION.sub("", reason)


def state_of(model: Any, what: str = "model=") -> Mapping[str, Any]:
    """The state dict of ``model`` (an ``nn.Module`` or a state dict); `TypeError` naming ``what``
    otherwise."""
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping) and all(isinstance(k, str) for k in model):
        if model and not any(isinstance(v, torch.Tensor) for v in model.values()):
            raise TypeError(f"{what} is a dict without tensors (keys {list(model)[:4]}): pass the model or its "
                            "state_dict (for a training checkpoint, the entry that holds the state_dict)")
        return model
    raise TypeError(f"{what} must be an nn.Module or a state dict (a mapping of tensor names to tensors); "
                    f"got {type(model).__name__}")


def block_slots(offset: int, outer: int, size: int, inner: int) -> "torch.Tensor":
    """Slot indices of an ``(outer, size, inner)`` block starting at ``offset``, in that shape."""
    return (offset + (torch.arange(outer).view(-1, 1, 1) * size + torch.arange(size).view(1, -1, 1)) * inner
            + torch.arange(inner).view(1, 1, -1))


def slot_coordinates(blocks: Iterable[tuple[int, int, int]], size: int, length: int) -> "torch.Tensor":
    """For slots ``0 .. length-1`` of a dim: which unit of a group of ``size`` holds each (-1: none),
    given the group's ``(offset, outer, inner)`` blocks there. Raises `SpecError` when two blocks
    cover one slot."""
    coord = torch.full((length,), -1, dtype=torch.long)
    for offset, outer, inner in blocks:
        idx = block_slots(offset, outer, size, inner)
        keep = idx < length
        if (coord[idx[keep]] >= 0).any():
            raise SpecError("two blocks of the parent cover one slot")
        coord[idx[keep]] = torch.arange(size).view(1, -1, 1).expand_as(idx)[keep]
    return coord


def chunks_by_parent(coord: "torch.Tensor", offset: int, outer: int, size: int, inner: int, m: int) -> bool:
    """Do a child block's outer chunks lie in parent slots ``k // (outer / m)`` (``coord`` from
    `slot_coordinates` of the parent's blocks on the same dim)?"""
    if outer % m:
        return False
    slots = block_slots(offset, outer, size, inner).reshape(outer, -1)
    want = (torch.arange(outer) // (outer // m)).view(-1, 1)
    return bool(slots.max() < coord.numel()) and torch.equal(coord[slots], want.expand_as(slots))


def _check_overlaps(tensor: str, dim: int, items: Iterable[tuple[str, int, int, int, int]]) -> None:
    """Two entries on one dim conflict when their slot ranges intersect and their factor ranges
    ``[inner, inner*size)`` overlap (the same slots moved at the same level)."""
    items = list(items)
    for i, (w1, o1, out1, s1, in1) in enumerate(items):
        for w2, o2, out2, s2, in2 in items[i + 1:]:
            e1, e2 = o1 + out1 * s1 * in1, o2 + out2 * s2 * in2
            if e1 <= o2 or e2 <= o1:
                continue
            if in1 * s1 <= in2 or in2 * s2 <= in1:
                continue
            raise SpecError(f"{w1} and {w2} both act on slots of {tensor!r} dim {dim} "
                            f"({o1}:{e1} and {o2}:{e2}) along the same factor")
