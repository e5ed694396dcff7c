"""The check: permuted model == model, in float64, on example inputs.

`verify_spec` is the check ``trace(verify=True)`` runs (as `verify_compiled`, whose failure
message blames a rule); `check_equivalence` compares one permuted copy with the model. Both run
eval-mode copies and never the caller's model. It is a check on examples, not a proof: soundness
comes from the rules.

`perturbed` returns a float64 copy of a model with every floating-point parameter and buffer
changed by a random factor (and all-zero tensors filled with small noise), so that a rule which
forgets a tensor cannot hide behind BatchNorm's default statistics (0 and 1) or a constant layer
scale. Signs are kept, so running variances stay positive. Non-persistent buffers stay constant
along the dims they are constant along (`autoperm._invariance`): no permutation can be written
into them, and the analysis only lets a group act on such a dim because it is constant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._args import (as_inputs, check_bool, check_materialized, check_module, check_seed, check_spec,
                    check_tolerance)
from ._copy import copy_module
from ._invariance import constant_dims, perturb_keeping
from .errors import ExampleInputError, UnsoundSpecError
from .permute import identity_permutation, permute, random_permutation
from .spec import PermutationSpec

__all__ = ["perturbed", "output_error", "check_equivalence", "verify_spec", "verify_compiled", "to_float64",
           "VerifyReport"]

log = logging.getLogger(__name__)


def to_float64(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


@torch.no_grad()
def perturbed(model: nn.Module, seed: int = 0, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy of ``model`` in ``dtype`` with every float parameter and buffer randomized."""
    check_module(model, "model")
    check_materialized(model, "model")
    gen = torch.Generator().manual_seed(check_seed(seed))
    out = copy_module(model).to(dtype).eval()
    seen: set[int] = set()
    fixed = {id(buf) for m in out.modules() for n, buf in m.named_buffers(recurse=False)
             if n in m._non_persistent_buffers_set}
    for t in list(out.parameters()) + list(out.buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        # a non-persistent buffer keeps the dims it is constant along (the analysis relies on them)
        perturb_keeping(t, constant_dims(t) if id(t) in fixed else [], gen)
    return out


@torch.no_grad()
def output_error(ref: Any, got: Any) -> float:
    """Largest absolute difference over the output leaves, relative to the largest |ref|."""
    ra = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor)]
    ga = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(ra) != len(ga):
        return float("inf")
    err, scale = 0.0, 0.0
    for r, g in zip(ra, ga):
        if r.shape != g.shape:
            return float("inf")
        if not r.is_floating_point():
            err = max(err, 0.0 if torch.equal(r, g) else float("inf"))
            continue
        err = max(err, (r.double() - g.double()).abs().max().item() if r.numel() else 0.0)
        scale = max(scale, r.double().abs().max().item() if r.numel() else 0.0)
    return err / max(scale, 1e-12)


@torch.no_grad()
def check_equivalence(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                      inputs: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Relative output error of ``permute(model, spec, perms)`` against ``model`` on ``inputs``.

    Both run as eval-mode copies (no dropout, BatchNorm's running statistics; the caller's model
    is never run nor modified), in the model's own dtype; pass a float64 model (`perturbed`) for
    a tight check. ``inputs`` with batch size 0 raise `ExampleInputError` (nothing to compare).
    """
    check_module(model, "model")
    check_spec(spec, call="check_equivalence(model, spec, perms, inputs)")
    x = as_inputs(inputs, "inputs=")
    check_materialized(model, "model")
    return _equivalence(copy_module(model).eval(), spec, perms, x, "inputs=")


def _equivalence(work: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                 inputs: tuple[torch.Tensor, ...], arg: str) -> float:
    """`check_equivalence` on ``work``, a copy the caller owns. The permuted copy is taken before
    the reference call, so that a model writing its buffers in ``forward`` (a running average, a
    step counter) starts both calls from the same state."""
    permuted = permute(work, spec, perms)
    ref = _reference(work, inputs, arg)
    got = permuted(*(t.clone() for t in inputs))
    return output_error(ref, got)


def _reference(model: nn.Module, inputs: tuple[torch.Tensor, ...], arg: str) -> Any:
    """``model(*inputs)`` (on clones: a forward may write to its inputs); an ExampleInputError
    naming ``arg`` when the model raises on them or returns no values to compare."""
    try:
        out = model(*(t.clone() for t in inputs))
    except Exception as e:
        raise ExampleInputError(
            f"the model raised when called on {arg} (shapes {[tuple(t.shape) for t in inputs]}): "
            f"{type(e).__name__}: {e}. Pass inputs the model's forward accepts.") from e
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not any(t.numel() for t in leaves):
        raise ExampleInputError(
            f"the model's outputs on {arg} hold no values (shapes {[tuple(t.shape) for t in leaves]}): a check "
            "that compares nothing passes whatever the spec; pass inputs that give non-empty outputs")
    return out


@dataclass
class VerifyReport:
    """What `verify_spec` measured: the error with all groups permuted, and per failing group.
    ``ok`` (also the report's truth value) is whether the error is within the tolerance."""

    error: float
    failing: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        """Whether the error is within the tolerance (a NaN error is not)."""
        return bool(self.error <= self.tolerance)

    def __bool__(self) -> bool:
        return self.ok


def verify_spec(model: nn.Module, spec: PermutationSpec, inputs: torch.Tensor | Sequence[torch.Tensor], *,
                seed: int = 0, tolerance: float = 1e-7, raise_on_failure: bool = True) -> VerifyReport:
    """Check ``spec`` on a perturbed float64 copy of ``model`` with no-fixed-point permutations.

    All groups are permuted at once; if the output changes, each group is checked alone so that
    the error names the group(s) at fault. A child group (one permutation per parent slot) is
    checked twice: with a derangement in every row, and with every other row left in place, so
    that its rows surely differ. Raises `UnsoundSpecError` naming the failing groups unless
    ``raise_on_failure=False``; ``inputs`` the model cannot run on, or with batch size 0, raise
    `ExampleInputError`. ``tolerance`` is a positive number.
    """
    return _verify(model, spec, inputs, seed=seed, tolerance=tolerance, raise_on_failure=raise_on_failure,
                   arg="inputs=", compiled=False)


def verify_compiled(model: nn.Module, spec: PermutationSpec, inputs: tuple[torch.Tensor, ...], *, seed: int = 0,
                    arg: str = "example_inputs=") -> VerifyReport:
    """`verify_spec` of a spec autoperm has just compiled (`trace`, `merge`): a failure is a bug in
    a permutation rule, and the message says so. ``arg`` names the inputs in messages."""
    return _verify(model, spec, inputs, seed=seed, tolerance=1e-7, raise_on_failure=True, arg=arg, compiled=True)


def _verify(model: nn.Module, spec: PermutationSpec, inputs: Any, *, seed: Any, tolerance: Any,
            raise_on_failure: Any, arg: str, compiled: bool) -> VerifyReport:
    check_module(model, "model")
    check_spec(spec, call="verify_spec(model, spec, inputs)")
    seed = check_seed(seed)
    tolerance = check_tolerance(tolerance)
    check_bool(raise_on_failure, "raise_on_failure")
    x = as_inputs(inputs, arg)
    m64 = perturbed(model, seed)  # raises if the model is on the meta device
    x64 = to_float64(x)
    try:
        ref = _reference(m64, x64, arg)
    except ExampleInputError as e:
        if isinstance(e.__cause__, Exception) and _runs(model, x):
            # the model runs on the inputs, but not in float64: not the inputs' fault, torch's own error
            raise e.__cause__ from None
        raise
    if not all(torch.isfinite(t).all() for t in tree_leaves(ref) if isinstance(t, torch.Tensor)
               and t.is_floating_point()):
        log.warning("perturbed model gives non-finite outputs; checking the unperturbed float64 model")
        m64 = copy_module(model).double().eval()
    perms = random_permutation(spec, seed, derangement=True)
    err = _equivalence(m64, spec, perms, x64, arg)
    if err <= tolerance and any(g.parent for g in spec.groups):
        # per-slot rows that differ for sure (with head_dim 2 every derangement row is [1, 0], and
        # rows that are all equal would only check the shared permutation): every other row kept
        uneven = dict(perms)
        for g in spec.groups:
            if g.parent:
                uneven[g.name] = perms[g.name].clone()
                uneven[g.name][::2] = torch.arange(g.size)
        err = max(err, _equivalence(m64, spec, uneven, x64, arg))
        perms = uneven if not err <= tolerance else perms
    failing: dict[str, float] = {}
    if not err <= tolerance:
        ident = identity_permutation(spec)
        for g in spec.groups:
            one = dict(ident)
            one[g.name] = perms[g.name]
            e = _equivalence(m64, spec, one, x64, arg)
            if not e <= tolerance:
                failing[g.name] = e
    report = VerifyReport(err, failing, tolerance)
    if raise_on_failure and not report.ok:
        raise UnsoundSpecError(_failure_message(spec, report, compiled))
    return report


@torch.no_grad()
def _runs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether an eval-mode copy of ``model`` runs on ``inputs`` in its own dtype."""
    try:
        copy_module(model).eval()(*(t.clone() for t in inputs))
    except Exception:  # noqa: BLE001 (any failure means: the inputs do not fit)
        return False
    return True


def _failure_message(spec: PermutationSpec, report: VerifyReport, compiled: bool) -> str:
    detail = "; ".join(f"group {n!r} ({spec.group(n).size} units, axes "
                       f"{[(a.tensor, a.dim) for a in spec.group(n).axes][:6]}): rel. error {e:.2e}"
                       for n, e in report.failing.items()) or "no single group fails; their combination does"
    head = (f"the {'compiled ' if compiled else ''}spec changes the model's function "
            f"(rel. error {report.error:.2e} > tolerance {report.tolerance:g}): {detail}.")
    if compiled:
        return (f"{head} This is a bug in a permutation rule: please report it with the model, or trace with "
                "verify=False to inspect the spec.")
    return (f"{head} Permuting {'these groups' if report.failing else 'the groups together'} changes the outputs: "
            "the spec moves them on too few tensors (a tensor the units flow through is missing from the group's "
            "axes, e.g. a bias, a norm's weight or the next layer's input dim) or on wrong ones (another dim, "
            "offset or size); fix the groups' axes, or compile the spec with autoperm.trace(model, inputs).")
