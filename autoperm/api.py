"""The public entry point of the compiler: `trace`."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from ._args import check_bool, check_materialized, check_module, check_not_meta, check_seed
from .analysis import analyze
from .frontend import capture, normalize_inputs
from .spec import PermutationSpec
from .verify import verify_compiled

__all__ = ["trace"]

log = logging.getLogger(__name__)


def trace(model: nn.Module, example_inputs: Any, *, verify: bool = True, strict: bool = False,
          seed: int = 0, hierarchical: bool = False) -> PermutationSpec:
    """Compile the `PermutationSpec` of ``model``; the model is never modified.

    ``example_inputs`` is a Tensor or a tuple of Tensors (the forward's positional arguments).
    With ``verify=True`` (the default) the spec is checked on a perturbed float64 copy of the
    model: every group is permuted with a no-fixed-point permutation and the outputs must match
    (`autoperm.verify.verify_spec`); a failure raises `UnsoundSpecError` naming the group. With
    ``strict=True`` an op without a rule raises `UnsupportedOpError` instead of being frozen.
    With ``hierarchical=True`` each attention head's head_dim group gets the heads group as its
    ``parent`` where the graph proves that every head may permute its head_dim on its own
    (`autoperm.hierarchy`); the check then draws one permutation per head. ``verify``, ``strict``
    and ``hierarchical`` are bools, ``seed`` an integer (else TypeError); a model with
    parameters on the meta device raises `TraceError` (materialize it first).

    Example::

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        spec = autoperm.trace(model, torch.randn(2, 4))
        print(spec.table())
        # tensor    shape   dim 0  dim 1
        # 0.weight  [8, 4]  0      .
        # 0.bias    [8]     0
        # 2.weight  [3, 8]  .      0
        # 2.bias    [3]     .
    """
    check_module(model, "model")
    for name, flag in (("verify", verify), ("strict", strict), ("hierarchical", hierarchical)):
        check_bool(flag, name)
    seed = check_seed(seed)
    check_materialized(model, "model")
    inputs = normalize_inputs(example_inputs)
    check_not_meta(inputs, "example_inputs=")
    t0 = time.perf_counter()
    tg = capture(model, inputs)
    t1 = time.perf_counter()
    spec = analyze(tg, strict=strict, hierarchical=hierarchical)
    t2 = time.perf_counter()
    spec.meta.update({"model": type(model).__name__, "inputs": len(inputs), "capture_s": round(t1 - t0, 4),
                      "analysis_s": round(t2 - t1, 4)})
    if verify:
        report = verify_compiled(model, spec, inputs, seed=seed, arg="example_inputs=")
        spec.meta["verify_error"] = report.error
        spec.meta["verify_s"] = round(time.perf_counter() - t2, 4)
    log.info("traced %s: %d groups, %d frozen entries (capture %.2fs, analysis %.2fs)",
             type(model).__name__, len(spec.groups), len(spec.frozen), t1 - t0, t2 - t1)
    return spec
