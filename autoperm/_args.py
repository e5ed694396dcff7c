"""Argument checks shared by the public entry points (`trace`, `random_permutation`, `permute`,
`verify_spec`, `check_equivalence`, `match` / `merge`, `interpolate`): each error names the
argument, the type or value expected, and what to do.

Example::

    check_spec("spec.json")   # TypeError: spec must be an autoperm.PermutationSpec, got str ...
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ExampleInputError, TraceError
from .spec import PermutationSpec

__all__ = ["check_module", "check_spec", "check_seed", "check_bool", "check_tolerance", "check_materialized",
           "check_not_meta", "as_inputs"]


def check_module(value: Any, name: str = "model") -> nn.Module:
    """``value`` if it is an nn.Module, else a TypeError naming ``name``."""
    if not isinstance(value, nn.Module):
        hint = (" (a state_dict?): load it into a model first, e.g. m = Net(); m.load_state_dict(sd)"
                if isinstance(value, Mapping) else "")
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}{hint}")
    return value


def check_spec(value: Any, name: str = "spec", *, call: str = "") -> PermutationSpec:
    """``value`` if it is a PermutationSpec, else a TypeError naming ``name`` with a hint for a
    path (load it), a model (trace it) and a dict of permutations (arguments swapped; ``call``
    is the signature to show)."""
    if isinstance(value, PermutationSpec):
        return value
    if isinstance(value, (str, os.PathLike)):
        hint = (f" ({str(value)!r}): load a saved spec with autoperm.PermutationSpec.load(path, model), or pass "
                f"{name}=None to compile one")
    elif isinstance(value, nn.Module):
        hint = ": compile the model's spec first with autoperm.trace(model, example_inputs) and pass that"
    elif isinstance(value, Mapping):
        hint = (" (a dict of permutations?): pass the PermutationSpec from autoperm.trace"
                + (f"; the order is {call}" if call else ""))
    else:
        hint = ": compile one with autoperm.trace(model, example_inputs)"
    raise TypeError(f"{name} must be an autoperm.PermutationSpec, got {type(value).__name__}{hint}")


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as an int (a Python or NumPy integer, never a bool), else a ValueError (as
    `match` has always raised)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: pass an integer (it seeds the random choices), got "
                         f"{type(value).__name__}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else a TypeError (a string such as ``"no"`` would read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: pass True or False, got {type(value).__name__}")
    return value


def check_tolerance(value: Any, name: str = "tolerance") -> float:
    """``value`` as a positive finite float, else a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: pass a positive number (the largest relative output error "
                        f"accepted, e.g. 1e-7), got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: pass a positive finite number (the largest relative output "
                         "error accepted, e.g. 1e-7); a value <= 0 fails every spec, even a sound one")
    return float(value)


def check_materialized(model: nn.Module, name: str = "model") -> None:
    """A TraceError naming the first parameter / buffer of ``model`` on the meta device (it has a
    shape but no values: nothing can be computed, compared or merged)."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for key, t in items:
            if t.device.type == "meta":
                raise TraceError(
                    f"{name}'s {kind} {key!r} is on the meta device (it has a shape but no values, e.g. a model "
                    f"built under torch.device('meta')): materialize {name} first, e.g. "
                    f"{name}.to_empty(device='cpu') and then {name}.load_state_dict(weights)")


def check_not_meta(inputs: tuple[torch.Tensor, ...], name: str) -> None:
    """An ExampleInputError naming ``name`` when an input tensor is on the meta device."""
    if any(t.device.type == "meta" for t in inputs):
        raise ExampleInputError(f"{name} holds tensors on the meta device (shapes {[tuple(t.shape) for t in inputs]}), "
                                "which have no values: pass real tensors, e.g. torch.randn(...) on the model's device")


def as_inputs(value: Any, name: str = "inputs=") -> tuple[torch.Tensor, ...]:
    """Inputs of a check (a Tensor, or a non-empty tuple / list of Tensors: the forward's
    positional arguments) as a tuple; an ExampleInputError naming ``name`` when they are
    malformed, on the meta device, or have batch size 0 (a check on no examples passes whatever
    it checks)."""
    if isinstance(value, torch.Tensor):
        inputs: tuple[torch.Tensor, ...] = (value,)
    elif isinstance(value, (tuple, list)) and value and all(isinstance(t, torch.Tensor) for t in value):
        inputs = tuple(value)
    else:
        raise ExampleInputError(f"{name} must be a Tensor or a non-empty tuple of Tensors (the forward's positional "
                                f"arguments), got {type(value).__name__}")
    check_not_meta(inputs, name)
    shapes = [tuple(t.shape) for t in inputs]
    if any(t.dim() >= 1 and t.shape[0] == 0 for t in inputs):
        raise ExampleInputError(f"{name} has batch size 0 (shapes {shapes}): a check on no examples compares "
                                "nothing and passes whatever the spec; pass at least one example (better two, "
                                "e.g. torch.randn(2, ...))")
    return inputs
