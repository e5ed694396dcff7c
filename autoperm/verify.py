"""The check: permuted model == model, in float64, on example inputs.

`check_equivalence` is the one function used by ``trace(verify=True)``, the tests and the
examples. It is a check on examples, not a proof: soundness comes from the rules.

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

from ._copy import copy_module
from ._invariance import constant_dims, perturb_keeping
from .errors import UnsoundSpecError
from .frontend import normalize_inputs
from .permute import identity_permutation, permute, random_permutation
from .spec import PermutationSpec

__all__ = ["perturbed", "output_error", "check_equivalence", "verify_spec", "to_float64"]

log = logging.getLogger(__name__)


def to_float64(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.double() if t.is_floating_point() else t for t in inputs)


@torch.no_grad()
def perturbed(model: nn.Module, seed: int = 0, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy of ``model`` in ``dtype`` with every float parameter and buffer randomized."""
    gen = torch.Generator().manual_seed(int(seed))
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

    Run in the model's own dtype; pass a float64 model (`perturbed`) for a tight check. The
    permuted copy is taken before the reference call, so that a model writing its buffers in
    ``forward`` (a running average, a step counter) starts both calls from the same state.
    """
    inputs = normalize_inputs(inputs)
    permuted = permute(model, spec, perms)
    ref = model(*(t.clone() for t in inputs))  # a forward may write to its inputs
    got = permuted(*(t.clone() for t in inputs))
    return output_error(ref, got)


@dataclass
class VerifyReport:
    """What `verify_spec` measured: the error with all groups permuted, and per failing group."""

    error: float
    failing: dict[str, float]
    tolerance: float


def verify_spec(model: nn.Module, spec: PermutationSpec, inputs: torch.Tensor | Sequence[torch.Tensor], *,
                seed: int = 0, tolerance: float = 1e-7, raise_on_failure: bool = True) -> VerifyReport:
    """Check ``spec`` on a perturbed float64 copy of ``model`` with no-fixed-point permutations.

    All groups are permuted at once; if the output changes, each group is checked alone so that
    the error names the group(s) at fault. A child group (one permutation per parent slot) is
    checked twice: with a derangement in every row, and with every other row left in place, so
    that its rows surely differ. Raises `UnsoundSpecError` unless
    ``raise_on_failure=False``.
    """
    m64 = perturbed(model, seed)
    x64 = to_float64(normalize_inputs(inputs))
    ref = m64(*(t.clone() for t in x64))
    if not all(torch.isfinite(t).all() for t in tree_leaves(ref) if isinstance(t, torch.Tensor)
               and t.is_floating_point()):
        log.warning("perturbed model gives non-finite outputs; checking the unperturbed float64 model")
        m64 = copy_module(model).double().eval()
    perms = random_permutation(spec, seed, derangement=True)
    err = check_equivalence(m64, spec, perms, x64)
    if err <= tolerance and any(g.parent for g in spec.groups):
        # per-slot rows that differ for sure (with head_dim 2 every derangement row is [1, 0], and
        # rows that are all equal would only check the shared permutation): every other row kept
        uneven = dict(perms)
        for g in spec.groups:
            if g.parent:
                uneven[g.name] = perms[g.name].clone()
                uneven[g.name][::2] = torch.arange(g.size)
        err = max(err, check_equivalence(m64, spec, uneven, x64))
        perms = uneven if not err <= tolerance else perms
    failing: dict[str, float] = {}
    if not err <= tolerance:
        ident = identity_permutation(spec)
        for g in spec.groups:
            one = dict(ident)
            one[g.name] = perms[g.name]
            e = check_equivalence(m64, spec, one, x64)
            if not e <= tolerance:
                failing[g.name] = e
    report = VerifyReport(err, failing, tolerance)
    if raise_on_failure and not err <= tolerance:
        detail = "; ".join(f"group {n!r} ({spec.group(n).size} units, axes "
                           f"{[(a.tensor, a.dim) for a in spec.group(n).axes][:6]}): rel. error {e:.2e}"
                           for n, e in failing.items()) or "no single group fails; their combination does"
        raise UnsoundSpecError(
            f"the compiled spec changes the model's function (rel. error {err:.2e} > {tolerance:g}): "
            f"{detail}. This is a bug in a permutation rule: please report it with the model, or "
            "trace with verify=False to inspect the spec.")
    return report
