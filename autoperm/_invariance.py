"""Which dims of a fixed tensor every permutation leaves unchanged.

A non-persistent buffer or a lifted constant has no state_dict key, so a permutation cannot be
written into it. Where the tensor is constant along a dim (all slices equal, e.g. the all-zero
``k_bias`` buffer of BEiT / EVA attention, or an anti-aliasing filter repeated per channel), any
permutation of that dim leaves it unchanged, so the dim need not be frozen. Example::

    >>> constant_dims(torch.zeros(6))
    [0]
    >>> constant_dims(torch.arange(6.).view(2, 3).expand(4, 2, 3))
    [0]
"""

from __future__ import annotations

import torch

__all__ = ["constant_dims", "perturb_keeping"]


def constant_dims(t: torch.Tensor) -> list[int]:
    """Dims of ``t`` (size > 1) along which every slice equals the first one."""
    out = []
    for d in range(t.dim()):
        if t.shape[d] > 1 and torch.equal(t, t.narrow(d, 0, 1).expand_as(t)):
            out.append(d)
    return out


@torch.no_grad()
def perturb_keeping(t: torch.Tensor, dims: list[int], gen: torch.Generator) -> None:
    """Randomize float ``t`` in place (times 0.5..1.5, or small noise if all zero) while keeping
    it constant along ``dims``, so the invariance the analysis relies on survives the check."""
    shape = [1 if d in dims else s for d, s in enumerate(t.shape)]
    if bool((t == 0).all()):
        t.copy_((0.1 * torch.randn(shape, generator=gen, dtype=t.dtype)).to(t.device).expand_as(t))
    else:
        t.mul_((0.5 + torch.rand(shape, generator=gen, dtype=t.dtype)).to(t.device))
