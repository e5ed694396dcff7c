"""Checks that the graph `autoperm.frontend.capture` exported is the model the user has. Each
returns the reason to freeze every dim of the model (or the keys to freeze), never a repair:

* `batch_reason`: a batch of one is exported at batch two (for a dynamic batch); a model that
  computes differently at one (a Python branch on the batch size) has two functions, and a spec
  of either graph can be unsound for the other, so nothing may move.
* `kept_caches`: tensors that the first call stores on a module, ``eval()`` does not clear, a
  second call reuses, and that change when the weights change: a permuted or merged copy would
  keep values computed from the old weights. Tensors aliasing a parameter or buffer, tensors
  recomputed on every call (a stored attention map) and caches that do not depend on the weights
  (a positional-encoding table, a detection grid) are not caches of this kind.
* `relaid_keys`: state_dict entries that are not the module's own tensor (a custom
  ``_save_to_state_dict`` storing it transposed or reshaped): the spec's dims are the entry's.

A cache already filled before tracing looks like a constant; the spec then describes the model
with that cache (see docs/faq.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ._copy import copy_module

__all__ = ["attribute_tensors", "kept_caches", "relaid_keys", "batch_reason"]

log = logging.getLogger(__name__)

_DEPTH = 3  # containers (dict / list / tuple) searched below a module attribute


def _mark(t: torch.Tensor) -> tuple:
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # no storage (some subclasses)
        ptr = 0
    return id(t), ptr, t._version, tuple(t.shape)


def attribute_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors modules hold as plain attributes (not parameters or buffers), directly or in
    dicts / lists / tuples / plain objects up to `_DEPTH` deep, by path (``"blocks.0.cache['k'][1]"``)."""
    out: dict[str, torch.Tensor] = {}

    def visit(path: str, value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            out[path] = value
        elif depth < _DEPTH and isinstance(value, dict):
            for k, v in value.items():
                visit(f"{path}[{k!r}]", v, depth + 1)
        elif depth < _DEPTH and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{path}[{i}]", v, depth + 1)
        elif depth < _DEPTH and not callable(value) and isinstance(getattr(value, "__dict__", None), dict):
            for k, v in vars(value).items():  # a plain helper object (modules are callable: visited apart)
                visit(f"{path}.{k}", v, depth + 1)

    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if attr not in ("_parameters", "_buffers", "_modules"):
                visit(f"{name}.{attr}".lstrip("."), value, 0)
    return out


def _perturbed_copy(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    probe = copy_module(model).eval()
    with torch.no_grad():
        for t in list(probe.parameters()) + list(probe.buffers()):
            if t.is_floating_point() and t.numel():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
                t.add_(noise * (0.1 * float(t.detach().float().abs().mean()) + 0.01))
    return probe


def kept_caches(model: nn.Module, work: nn.Module, inputs: tuple[torch.Tensor, ...],
                before: dict[str, torch.Tensor]) -> list[str]:
    """Paths of weight-dependent caches (module docstring) after ``work`` (a copy of ``model``,
    never called before) ran once on ``inputs``; ``before`` is `attribute_tensors` of ``work``
    before that call. Runs ``work`` once more, and a perturbed copy of ``model`` once."""
    marks = {k: _mark(v) for k, v in before.items()}
    first = attribute_tensors(work)
    own = {t.data_ptr() for t in list(work.parameters()) + list(work.buffers()) if t.numel()}
    changed = [k for k, v in first.items() if marks.get(k) != _mark(v) and not (v.numel() and v.data_ptr() in own)]
    if not changed:
        return []
    with torch.no_grad():
        work(*(t.clone() for t in inputs))
    work.eval()
    second = attribute_tensors(work)
    reused = [k for k in changed if k in second and _mark(second[k]) == _mark(first[k])]
    if not reused:
        return []
    probe = _perturbed_copy(model)
    with torch.no_grad():
        probe(*(t.clone() for t in inputs))
    other = attribute_tensors(probe)
    return sorted(k for k in reused if not (k in other and other[k].shape == first[k].shape
                                            and torch.equal(other[k], first[k])))


def relaid_keys(model: nn.Module, keys) -> dict[str, str]:
    """State-dict keys whose entry (as ``state_dict()`` returns it) is not a view of the module's
    own tensor with its shape and strides."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    saved = model.state_dict()
    out = {}
    for k in keys:
        t, s = own.get(k), saved.get(k)
        if t is None or not isinstance(s, torch.Tensor):
            continue
        if (s.shape, s.stride(), s.dtype) != (t.shape, t.stride(), t.dtype) or (t.numel() and s.data_ptr() != t.data_ptr()):
            out[k] = "its state_dict entry is not the module's tensor (a custom _save_to_state_dict may store another layout)"
    return out


def batch_reason(ep, snapshot: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """None when the program ``ep`` (exported at batch two) gives ``snapshot``'s outputs at the
    example's batch of one, both run from the same state and random seed; else the reason."""
    from .verify import output_error

    cuda = [t.device.index or 0 for t in inputs if t.is_cuda][:1]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            expected = snapshot(*(t.clone() for t in inputs))
            torch.manual_seed(0)
            got = ep.module()(*(t.clone() for t in inputs))
        err = output_error(expected, got)
    except Exception as e:  # a guard of the dynamic batch, or outputs that cannot be compared
        log.debug("the exported program at the example batch: %s: %s", type(e).__name__, e)
        err = float("inf")
    if err <= 1e-4:
        return None
    return ("the model computes differently at batch 1 (the example) than at batch 2 (a branch on the batch "
            "size?), so no spec holds for both: trace with an example batch of 2 or more")
