"""Rewrites: merges and edits that change a model's architecture and return an emitted module
(DESIGN.md section 4): Preserve-First Merging (`pfm`), partial merging (`partial`, another
module), permutation layers (`perm_layers`), all built by the emitter (`emit`).

``autoperm.merge(..., preserve_first=l)`` and ``merge(..., partial=g)`` land in `rewrite_merge`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from .._copy import copy_module
from ..example_inputs import rewrite_graph
from ..frontend import capture
from ..merge import interpolate_state
from ..merge.normalize import has_batchnorm
from ..merge.regression import check_ridge
from ..permute import permute_state_dict
from .emit import EmitError, check_module, emit, flop_count, graph_from_traced, original_state_dict, param_count
from .perm_layers import insert_perm_layers

__all__ = ["rewrite_merge", "pfm_merge", "emit", "graph_from_traced", "check_module", "param_count", "flop_count",
           "original_state_dict", "insert_perm_layers", "EmitError"]

log = logging.getLogger(__name__)
PFM_NORMALIZATIONS = (None, "reset", "repair", "rescale", "regression", "bias_calibration", "bias_removal")
DATA_FREE = (None, "bias_calibration", "bias_removal")


def pfm_merge(model_a: nn.Module, model_b: nn.Module, alignment, *, alpha: float = 0.5, preserve_first: int = 1,
              normalize: str | None = None, data: Iterable | None = None, example_inputs: Any = None,
              ridge: float | None = None, bias_layers: int | None = None) -> nn.Module:
    """Preserve-First Merging (the Vanishing Feature paper, section 4.4; `autoperm.rewrite.pfm`):
    a new module that runs the first ``preserve_first`` counted layers of model_a and of aligned
    model_b side by side on the same input, merges their outputs with weight ``alpha`` on model_b,
    and runs the interpolated rest. ``normalize`` (None, "reset", "repair", "rescale", "regression",
    which need ``data``, or the data-free "bias_calibration" / "bias_removal" with ``bias_layers``;
    `autoperm.rewrite.pfm_normalize`) acts on the merged part only. Neither model is modified.
    Example::

        al = autoperm.match(model_a, model_b)
        pfm = pfm_merge(model_a, model_b, al, preserve_first=8, normalize="repair", data=loader)
    """
    from ..merging import check_preserve_first
    from .pfm import pfm_module

    check_preserve_first(preserve_first)
    preserve_first = int(preserve_first)
    if normalize not in PFM_NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not supported with preserve_first > 0; PFM supports "
                         f"{list(PFM_NORMALIZATIONS)}")
    if normalize not in DATA_FREE and data is None:
        raise ValueError(f"normalize={normalize!r} needs data=: an iterable of input batches")
    if bias_layers is not None and normalize != "bias_removal":
        raise ValueError(f"bias_layers= is used only by normalize='bias_removal' (got normalize={normalize!r}): "
                         "drop it or pass normalize='bias_removal'")
    check_ridge(ridge, normalize)
    if data is not None and iter(data) is data:
        data = list(data)
    tg, inputs = rewrite_graph(model_a, alignment, example_inputs, data)
    sa = model_a.state_dict()
    aligned_b = permute_state_dict(model_b.state_dict(), alignment.spec, alignment.perms)
    states = {"model_a": sa, "model_b": aligned_b, "merged": interpolate_state(sa, aligned_b, alpha)}
    if normalize in ("bias_calibration", "bias_removal"):
        from .pfm import preserved_nodes
        from .pfm_normalize import bias_merged

        states["merged"] = bias_merged(tg, preserved_nodes(tg, preserve_first), states, alpha, normalize, bias_layers)
    with torch.no_grad():
        outputs = copy_module(model_a).eval()(*inputs)
    b_constants = capture(model_b, inputs).constants if tg.constants else None  # model_b's own
    grouped = {ax.tensor for g in alignment.spec.groups for ax in g.axes if ax.dim == 0}
    module = pfm_module(model_a, tg, states, preserve_first, alpha, inputs, outputs,
                        None if normalize in DATA_FREE else normalize, data, b_constants, grouped,
                        ridge=ridge).train(model_a.training)
    if normalize in DATA_FREE and has_batchnorm(model_a):
        log.info("BatchNorm statistics of the merged part were interpolated; normalize='reset' with data is "
                 "usually far better")
    return module


def rewrite_merge(model_a: nn.Module, model_b: nn.Module, alignment, *, alpha: float = 0.5, preserve_first: int = 0,
                  partial: Any = 0.0, normalize: str | None = None, data: Iterable | None = None,
                  example_inputs: Any = None, ridge: float | None = None,
                  bias_layers: int | None = None) -> nn.Module:
    """The architecture-changing merges behind `autoperm.merge`: PFM when ``preserve_first > 0``,
    partial merging (`autoperm.rewrite.partial.partial_merge`) when ``partial`` is given."""
    if preserve_first and partial:
        raise ValueError("preserve_first > 0 together with partial > 0 is not supported (v1): pick one")
    if partial:
        from .partial import Partial, partial_merge

        if bias_layers is not None:
            raise ValueError("bias_layers= is not supported with partial= (partial merging has no bias "
                             "normalization): drop it")
        options = partial.options() if isinstance(partial, Partial) else {"partial": partial}
        return partial_merge(model_a, model_b, alignment, alpha=alpha, normalize=normalize, data=data,
                             example_inputs=example_inputs, ridge=ridge, **options)
    return pfm_merge(model_a, model_b, alignment, alpha=alpha, preserve_first=preserve_first, normalize=normalize,
                     data=data, example_inputs=example_inputs, ridge=ridge, bias_layers=bias_layers)
