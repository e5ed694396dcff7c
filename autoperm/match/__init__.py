"""Matchers: find the permutations that line model B up with model A.

All matchers share one signature and live in one table, `METHODS`. ``"identity"`` is naive
averaging (no alignment), the baseline every benchmark reports. What each method needs:

* ``"identity"``, ``"weight"``: nothing but the weights;
* ``"activation"``: input batches (``data``);
* ``"sinkhorn"``: nothing (weight-distance objective), or with ``loss_fn`` the midpoint loss on
  ``data`` batches that carry targets;
* ``"ste"``: ``data`` batches with targets and ``loss_fn``.

The iterative methods (``"sinkhorn"``, ``"ste"``) take a step budget and a learning rate
(`DEFAULT_STEPS`, `DEFAULT_LR`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from ..permute import identity_permutation
from ..spec import PermutationSpec
from ._loss import MidpointLoss, check_loss_fn, check_targets
from .activation import activation_matching
from .sinkhorn import sinkhorn_matching
from .ste import ste_matching
from .assignment import solve_assignment, unit_matrix
from .weight import weight_matching
from .hierarchical import REFINED, has_children, refine_children  # noqa: E402  (uses the matchers above)

__all__ = ["Alignment", "MatchContext", "METHODS", "NEEDS_DATA", "NEEDS_GRAPH", "DEFAULT_STEPS", "DEFAULT_LR",
           "check_method_args", "activation_matching", "sinkhorn_matching", "ste_matching", "solve_assignment",
           "unit_matrix", "weight_matching"]

log = logging.getLogger(__name__)


@dataclass
class Alignment:
    """What a matcher found: ``perms`` to apply to model B, the objective per pass, timings."""

    perms: dict[str, torch.Tensor]
    method: str
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    spec: PermutationSpec | None = None
    traced: Any = field(default=None, repr=False)  # model_a's TracedGraph, reused by REPAIR
    sites: Any = field(default=None, repr=False)   # its groups' activation sites (with traced)


@dataclass
class MatchContext:
    """Everything a matcher may use. Weight matching reads only the spec and the state dicts."""

    spec: PermutationSpec
    state_a: Mapping[str, torch.Tensor]
    state_b: Mapping[str, torch.Tensor]
    seed: int = 0
    max_iter: int = 100
    data: Iterable | None = None
    traced: Any = None   # autoperm.frontend.TracedGraph of model_a
    sites: Any = None    # group name -> list[autoperm.analysis.Site]
    features: str = "pre"
    loss_fn: Callable | None = None   # loss_fn(outputs, target) for "sinkhorn" (optional) and "ste"
    steps: int | None = None          # step budget of "sinkhorn" / "ste" (None: DEFAULT_STEPS)
    lr: float | None = None           # learning rate of "sinkhorn" / "ste" (None: DEFAULT_LR)
    model_a: Any = None               # the caller's model_a (copied, never changed) for the loss
    n_inputs: int = 1                 # how many leading items of a batch are inputs
    starts: int | None = None         # "weight": 1 or 2 descents (None: weight_matching's default)
    tol: float | None = None          # "weight": stop when a pass gains less than this share (None: 0)


def _identity(ctx: MatchContext):
    return identity_permutation(ctx.spec), []


def _weight(ctx: MatchContext):
    extra = {k: v for k, v in (("starts", ctx.starts), ("tol", ctx.tol)) if v is not None}
    return weight_matching(ctx.spec, ctx.state_a, ctx.state_b, seed=ctx.seed, max_iter=ctx.max_iter, **extra)


def _activation(ctx: MatchContext):
    return activation_matching(ctx.spec, ctx.traced, ctx.sites, ctx.state_a, ctx.state_b, ctx.data,
                               features=ctx.features, n_inputs=ctx.n_inputs)


def _midpoint_loss(ctx: MatchContext, method: str) -> MidpointLoss:
    return MidpointLoss(ctx.model_a, ctx.state_a, ctx.state_b, ctx.data, ctx.loss_fn, n_inputs=ctx.n_inputs,
                        method=method)


def _sinkhorn(ctx: MatchContext):
    if ctx.loss_fn is None and ctx.data is not None:
        log.info("method='sinkhorn' without loss_fn=: weight-distance objective, data= is not used")
    objective = None if ctx.loss_fn is None else _midpoint_loss(ctx, "sinkhorn")
    return sinkhorn_matching(ctx.spec, ctx.state_a, ctx.state_b, objective=objective, seed=ctx.seed,
                             steps=_option(ctx.steps, DEFAULT_STEPS["sinkhorn"]),
                             lr=_option(ctx.lr, DEFAULT_LR["sinkhorn"]))


def _ste(ctx: MatchContext):
    return ste_matching(ctx.spec, ctx.state_a, ctx.state_b, _midpoint_loss(ctx, "ste"), seed=ctx.seed,
                        steps=_option(ctx.steps, DEFAULT_STEPS["ste"]), lr=_option(ctx.lr, DEFAULT_LR["ste"]),
                        max_iter=ctx.max_iter)


def _option(value, default):
    return default if value is None else value


Matcher = Callable[[MatchContext], tuple[dict[str, torch.Tensor], list[float]]]
METHODS: dict[str, Matcher] = {"identity": _identity, "weight": _weight, "activation": _activation,
                               "sinkhorn": _sinkhorn, "ste": _ste}
NEEDS_DATA = {"activation", "ste"}   # always; "sinkhorn" needs data only with loss_fn
NEEDS_GRAPH = {"activation"}         # matchers that read model_a's traced graph
DEFAULT_STEPS = {"sinkhorn": 300, "ste": 100}
DEFAULT_LR = {"sinkhorn": 0.1, "ste": 1e-3}
_LOSS_METHODS = {"sinkhorn", "ste"}


def check_method_args(method: str, data: Any, loss_fn: Any, steps: Any = None, lr: Any = None,
                      n_inputs: int = 1, starts: Any = None, tol: Any = None, max_iter: Any = 100,
                      features: Any = "pre") -> None:
    """Raise a ValueError naming the parameter when ``method`` lacks what it needs (or gets an
    option it does not use). Cheap: run before any tracing."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not available; choose one of {sorted(METHODS)}")
    for name, value in (("starts", starts), ("tol", tol)):
        if value is not None and method != "weight":
            raise ValueError(f"{name}= is used only by method='weight', not by method={method!r}: drop it")
    if max_iter != 100 and method not in ("weight", "ste"):  # 100: the default, given or not
        raise ValueError(f"max_iter= is used only by method='weight' and method='ste', not by method={method!r}: "
                         "drop it")
    if features != "pre" and method != "activation":
        raise ValueError(f"features= is used only by method='activation', not by method={method!r}: drop it")
    if starts is not None and (isinstance(starts, bool) or starts not in (1, 2)):
        raise ValueError(f"starts={starts!r}: pass 1 (one descent from the identity, the fast option) or 2")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise ValueError(f"tol={tol!r}: pass a number in [0, 1): weight matching stops once a pass gains "
                         "less than this share of the objective (0: only when a pass changes nothing)")
    if method == "activation" and data is None:
        raise ValueError("method='activation' needs data=: an iterable of input batches")
    if method == "ste" and (data is None or loss_fn is None):
        missing = "data=" if data is None else "loss_fn="
        raise ValueError(f"method='ste' needs {missing}: it minimizes the midpoint model's loss, so pass "
                         "data= (an iterable of (inputs, target) batches) and loss_fn= (a callable "
                         "loss_fn(outputs, target), e.g. torch.nn.functional.cross_entropy)")
    if method == "sinkhorn" and loss_fn is not None and data is None:
        raise ValueError("method='sinkhorn' with loss_fn= minimizes the midpoint loss on data and needs data=: "
                         "an iterable of (inputs, target) batches (or drop loss_fn= for the weight-distance "
                         "objective, which needs no data)")
    if method not in _LOSS_METHODS:
        for name, value in (("loss_fn", loss_fn), ("steps", steps), ("lr", lr)):
            if value is not None:
                raise ValueError(f"{name}= is used only by method='sinkhorn' and method='ste', not by "
                                 f"method={method!r}: drop it or pick one of those methods")
        return
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps={steps!r}: pass a non-negative integer step budget")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf")):
        raise ValueError(f"lr={lr!r}: pass a positive, finite learning rate")
    if loss_fn is not None:
        check_loss_fn(method, loss_fn)
        if isinstance(data, (list, tuple)) and data:  # generators were listed by the caller
            check_targets(method, data[0], n_inputs)


def run_matcher(method: str, ctx: MatchContext) -> tuple[dict[str, torch.Tensor], list[float]]:
    check_method_args(method, ctx.data, ctx.loss_fn, ctx.steps, ctx.lr, ctx.n_inputs, ctx.starts, ctx.tol,
                      ctx.max_iter, ctx.features)
    perms, history = METHODS[method](ctx)
    if method in REFINED and has_children(ctx.spec):  # one head_dim permutation per head
        perms, more = refine_children(method, ctx, perms)
        history = history + more
    return perms, history
