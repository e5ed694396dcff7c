"""Coverage measures of a spec (DESIGN.md section 6).

* ``param_share``: the share of parameter elements that some group moves (an element is moved
  when its index along some dim lies in the block of an axis on that dim). It can be gamed: a
  transformer's residual-stream group alone touches almost every parameter.
* ``hidden_share``: the share of *hidden channel atoms* (output channels of conv / linear /
  embedding layers, excluding the model's outputs) that lie in a group of size >= 2.

Example::

    cov = coverage(spec, model)
    cov.param_share, cov.hidden_share   # (0.97, 1.0) for a ResNet
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .spec import PermutationSpec

__all__ = ["Coverage", "coverage"]

_OUT_DIM = {nn.Linear: 0, nn.Conv1d: 0, nn.Conv2d: 0, nn.Conv3d: 0, nn.Embedding: 1,
            nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 1, nn.ConvTranspose3d: 1}


@dataclass(frozen=True)
class Coverage:
    param_share: float
    hidden_share: float
    hidden_atoms: int
    hidden_grouped: int
    param_elements: int


def _covered_slots(spec: PermutationSpec, tensor: str, dim: int, min_size: int = 1) -> set[int]:
    slots: set[int] = set()
    for g, a in spec.axes_of(tensor):
        if a.dim == dim and g.size >= min_size:
            slots.update(range(a.offset, a.offset + a.extent(g.size)))
    return slots


def _moved_elements(spec: PermutationSpec, tensor: str, shape: tuple[int, ...]) -> int:
    untouched = 1
    for d, n in enumerate(shape):
        untouched *= n - len(_covered_slots(spec, tensor, d))
    return math.prod(shape) - untouched


def coverage(spec: PermutationSpec, model: nn.Module) -> Coverage:
    """Both coverage measures of ``spec`` for ``model`` (the model is only read)."""
    canon = {alias: c for c, names in spec.tied.items() for alias in names}
    total = moved = 0
    seen: set[str] = set()
    for name, p in model.named_parameters():
        key = canon.get(name, name)
        if key in seen or key not in spec.shapes:
            continue
        seen.add(key)
        total += p.numel()
        moved += _moved_elements(spec, key, tuple(p.shape))
    hidden = grouped = 0
    for mname, mod in model.named_modules():
        dim = next((d for cls, d in _OUT_DIM.items() if isinstance(mod, cls)), None)
        key = f"{mname}.weight" if mname else "weight"
        key = canon.get(key, key)
        if dim is None or key not in spec.shapes:
            continue
        outputs = {s for f in spec.frozen_of(key) if f.dim == dim and f.reason == "model output"
                   for s in range(f.offset, f.offset + f.extent())}
        n = spec.shapes[key][dim]
        hidden += n - len(outputs)
        grouped += len(_covered_slots(spec, key, dim, min_size=2) - outputs)
    return Coverage(moved / total if total else 0.0, grouped / hidden if hidden else 0.0, hidden, grouped, total)
