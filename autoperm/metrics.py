"""Coverage measures of a spec (DESIGN.md section 6).

* ``param_share``: the share of parameter elements that some group moves (an element is moved
  when its index along some dim lies in the block of an axis on that dim). It can be gamed: a
  transformer's residual-stream group alone touches almost every parameter.
* ``hidden_share``: the share of *hidden channel atoms* (output channels of conv / linear /
  embedding layers and of `nn.MultiheadAttention`'s input projections, excluding the model's
  outputs and an embedding's vocabulary rows, e.g. those of a tied LM head) that lie in a group
  of size >= 2.

Both are ``nan`` when nothing is counted (0 / 0).

Example::

    cov = coverage(spec, model)
    cov.param_share, cov.hidden_share   # (0.97, 1.0) for a ResNet
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .spec import PermutationSpec, block_slots

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
    """Both coverage measures of ``spec`` for ``model`` (the model is only read).

    ``model`` must be the model the spec was compiled for (`PermutationSpec.check_model`, else
    `ShapeMismatchError` naming the tensor). A share whose count is empty (a model without
    parameters, or without hidden channels) is ``nan``.
    """
    if not isinstance(spec, PermutationSpec):
        hint = " (arguments swapped? call coverage(spec, model))" if isinstance(model, PermutationSpec) else ""
        raise TypeError(f"coverage(spec=...) must be a PermutationSpec from autoperm.trace; got "
                        f"{type(spec).__name__}{hint}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"coverage(model=...) must be the nn.Module the spec was traced from; got "
                        f"{type(model).__name__} (for a state dict, load it into the model first)")
    spec.check_model(model.state_dict())
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
    atoms = _hidden_atoms(model, canon)
    token_dims = {(key, 0) for key, dim, kind in atoms if kind == "embedding"}  # vocabulary rows, not channels
    hidden = grouped = 0
    for key, dim, _ in dict.fromkeys(atoms):
        if key not in spec.shapes or (key, dim) in token_dims:
            continue
        outputs = _output_slots(spec, key, dim)
        hidden += spec.shapes[key][dim] - len(outputs)
        grouped += len(_covered_slots(spec, key, dim, min_size=2) - outputs)
    nan = float("nan")
    return Coverage(moved / total if total else nan, grouped / hidden if hidden else nan, hidden, grouped, total)


def _hidden_atoms(model: nn.Module, canon: dict[str, str]) -> list[tuple[str, int, str]]:
    """(canonical tensor, output dim, kind) of every layer with output channels: conv / linear /
    embedding weights, and `nn.MultiheadAttention`'s input projections."""
    out = []
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, nn.MultiheadAttention):
            names = ["in_proj_weight"] if mod.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight",
                                                                                "v_proj_weight"]
            out += [(canon.get(prefix + n, prefix + n), 0, "attention") for n in names]
            continue
        dim = next((d for cls, d in _OUT_DIM.items() if isinstance(mod, cls)), None)
        if dim is not None:
            key = canon.get(prefix + "weight", prefix + "weight")
            out.append((key, dim, "embedding" if isinstance(mod, nn.Embedding) else "layer"))
    return out


def _output_slots(spec: PermutationSpec, key: str, dim: int) -> set[int]:
    """Slots of ``key``'s ``dim`` that are the model's output: frozen as "model output", or listed
    in ``spec.meta["outputs"]`` (``[tensor, dim, offset, outer, size, inner]`` entries, which
    record an output frozen first for another reason)."""
    blocks = [(f.offset, f.outer, f.size, f.inner) for f in spec.frozen_of(key)
              if f.dim == dim and f.reason == "model output"]
    blocks += [tuple(e[2:6]) for e in spec.meta.get("outputs", ()) if e[0] == key and e[1] == dim]
    return {int(s) for o, out, n, i in blocks for s in block_slots(o, out, n, i).flatten()}
