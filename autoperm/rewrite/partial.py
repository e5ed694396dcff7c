"""Partial merging: merge the units that match, keep the others of both models side by side
(Partial Model Merging thesis, ../papers/004, chapter 3; DESIGN.md section 4).

Each group's assignment is extended by ``ceil(gamma * n)`` buffer units (thesis section 3.2):
with *forced* assignment exactly that many A/B pairs are pulled apart (the extended linear
assignment keeps the ``n - k`` matches with the best total similarity), with *adaptive*
assignment a pair is pulled apart only where its similarity is below ``threshold`` (at most
``k`` of them). Every tensor the group touches is widened to ``n + k`` units: matched units are
interpolated, unmatched units of both models are kept (section 3.3), and the emitted module is a
real ``nn.Module`` (a ``torch.fx.GraphModule`` from `autoperm.rewrite.emit`) whose view /
reshape sizes, LayerNorm shapes and conv group counts were patched from the atom model.

**Deviation from the thesis, on purpose.** The thesis keeps the outgoing weights of unmatched
units at full scale (``W'1 + W'2``), so at gamma = 1 its model computes ``f_A + f_B``, the
*sum* of the two models' logits. Here the outgoing weights of an unmatched unit into a merged
unit or into the output are scaled by ``(1 - alpha)`` (A's units) and ``alpha`` (B's units), so
``partial=1`` is the ensemble ``(1 - alpha) f_A + alpha f_B`` and ``partial=0`` the full merge.

That limit is exact when every op the widened units meet is unit-local (linear / conv inputs,
pointwise ops, BatchNorm in eval, pooling, residual sums). LayerNorm / RMSNorm and GroupNorm
normalize over the widened units, so they are widened but the result is not the ensemble (the
gap is reported in `PartialResult.nonlocal_ops` and measured in the tests); attention is widened
by whole heads, while head_dim groups (summed over in q.k, whose 1/sqrt(d) scale would change)
and groups whose widening would change a grouped conv's group count are not widened, with the
reason in `PartialResult.frozen`. Tied weights read in two roles are not widened either.

``normalize`` takes RESET / REPAIR / RESCALE (goal statistics per unit, thesis section 4.2) and
autoperm's ``"regression"`` (every conv / linear layer of the widened model refit to a matched
unit's interpolated output and an unmatched unit's own model's output): `partial_normalize`.

Worked example (thesis section 4.2: +20% width in every layer)::

    al = autoperm.match(model_a, model_b, method="activation", data=batches)
    merged = partial_merge(model_a, model_b, al, partial=0.2, data=batches)        # forced
    merged = partial_merge(model_a, model_b, al, partial={"fc1": 1.0})            # one group
    merged = partial_merge(model_a, model_b, al, partial=1.0, assignment="adaptive",
                           threshold=0.4, data=batches)   # split pairs with correlation < 0.4
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .._copy import copy_module
from ..analysis import analyze_with_sites
from ..errors import AutopermError
from ..example_inputs import rewrite_graph
from ..frontend import TracedGraph
from ..permute import apply_axis, unit_rows
from ..verify import output_error
from ..match.hierarchical import absorb_children
from .emit import buffer_keys, emit, graph_from_traced, output_spec
from .partial_graph import check_shapes, contraction_dims, node_layouts, param_layouts, patch_sizes
from .partial_locality import locality
from .partial_normalize import normalize_widened, regress_widened
from .partial_widen import WidenError, buffer_count, extend_assignment, keep_alignment, widen_state

__all__ = ["Partial", "PartialResult", "partial_merge", "partial_widen", "benefit_factors", "benefit_order",
           "benefit_greedy", "Greedy", "GreedyStep", "widened_params"]

log = logging.getLogger(__name__)
_NORMALIZE = (None, "reset", "repair", "rescale", "regression")


@dataclass(frozen=True)
class Partial:
    """Partial-merging options for ``autoperm.merge(..., partial=Partial(...))``, where a plain
    number or ``{group: gamma}`` dict means forced assignment with those gammas. ``gamma``,
    ``assignment`` (``"forced"`` or ``"adaptive"``), ``threshold`` (the adaptive epsilon) and
    ``similarity`` are `partial_merge`'s arguments of the same names. Example::

        merged = autoperm.merge(a, b, method="activation", data=batches,
                                partial=autoperm.Partial(1.0, assignment="adaptive", threshold=0.4))
    """

    gamma: float | Mapping[str, float] = 0.5
    assignment: str = "forced"
    threshold: float = 0.0
    similarity: str = "auto"

    def options(self) -> dict[str, Any]:
        """`partial_merge` keyword arguments."""
        return {"partial": self.gamma, "assignment": self.assignment, "threshold": self.threshold,
                "similarity": self.similarity}


@dataclass
class PartialResult:
    """A partial merge and what it did: ``widths[group] = (n, n + k)``; ``frozen`` groups that
    were asked to widen but could not, with the reason; ``nonlocal_ops`` the widened groups that
    meet non-unit-local ops (there ``partial=1`` is not exactly the ensemble); parameter counts
    of model A and of the merged model (``nonzero``: elements that are not exactly zero);
    ``merged_dims`` the reasons of hidden dims the spec froze (always merged, never widened)."""

    module: nn.Module
    widths: dict[str, tuple[int, int]]
    frozen: dict[str, str] = field(default_factory=dict)
    nonlocal_ops: dict[str, list[str]] = field(default_factory=dict)
    params_base: int = 0
    params: int = 0
    nonzero: int = 0
    merged_dims: list[str] = field(default_factory=list)

    @property
    def exact_limits(self) -> bool:
        """True when ``partial=1`` is exactly the ensemble for this model: every widened group
        meets only unit-local ops, no group was kept from widening and no hidden dim is frozen."""
        return not self.frozen and not self.merged_dims and not any(
            self.nonlocal_ops.get(g) for g, (n, w) in self.widths.items() if w > n)

    @property
    def added(self) -> float:
        """Relative parameter increase over model A."""
        return self.params / max(self.params_base, 1) - 1.0


def _gammas(partial: Any, names: list[str]) -> dict[str, float]:
    def check(value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{where}={value!r}: the share of buffer units must be a number in [0, 1]")
        return float(value)

    if isinstance(partial, Mapping):
        unknown = sorted(str(k) for k in partial if k not in names)
        if unknown:
            raise ValueError(f"partial names unknown groups {unknown}; the spec's groups are {names}")
        return {g: check(partial.get(g, 0.0), f"partial[{g!r}]") for g in names}
    gamma = check(partial, "partial")
    return {g: gamma for g in names}


def _weight_similarity(spec, g, state_a, state_b, perms) -> torch.Tensor:
    """Cosine similarity of A's and B's units over all the group's axes (other groups of B
    aligned by ``perms``)."""
    rows_a, rows_b = [], []
    for ax in g.axes:
        ta, tb = state_a[ax.tensor], state_b[ax.tensor]
        if not ta.is_floating_point():
            continue
        for h, ax2 in spec.axes_of(ax.tensor):
            if h is not g:
                tb = apply_axis(tb, ax2, perms[h.name])
        rows_a.append(unit_rows(ta, ax, g.size).double())
        rows_b.append(unit_rows(tb, ax, g.size).double())
    ua = torch.nn.functional.normalize(torch.cat(rows_a, 1), dim=1)
    ub = torch.nn.functional.normalize(torch.cat(rows_b, 1), dim=1)
    return ua @ ub.T


def _similarities(spec, tg, sites, wanted, state_a, state_b, perms, data, n_inputs, how) -> dict[str, torch.Tensor]:
    if how not in ("auto", "activation", "weight"):
        raise ValueError(f"similarity={how!r}: choose 'auto', 'activation' or 'weight'")
    if how == "activation" and not data:
        raise ValueError("similarity='activation' needs data=: an iterable of input batches")
    out: dict[str, torch.Tensor] = {}
    if data and how != "weight" and wanted:
        from .._stats import pair_statistics
        from ..match.activation import select_sites

        chosen = {g: ss for g, ss in select_sites(sites, "pre").items() if g in wanted and ss}
        stats = pair_statistics(tg, chosen, {g.name: g.size for g in spec.groups}, state_a, state_b, data,
                                n_inputs)
        out = {g: st.correlation() for g, st in stats.items()}
    for g in spec.groups:
        if g.name in wanted and g.name not in out:
            out[g.name] = _weight_similarity(spec, g, state_a, state_b, perms)
    return out


def partial_widen(model_a: nn.Module, model_b: nn.Module, alignment, *, alpha: float = 0.5,
                  partial: float | Mapping[str, float] = 0.5, normalize: str | None = None,
                  data: Iterable | None = None, example_inputs: Any = None, assignment: str = "forced",
                  threshold: float = 0.0, similarity: str = "auto", traced: TracedGraph | None = None,
                  ridge: float | None = None) -> PartialResult:
    """`partial_merge`, returning a `PartialResult` (the module and what was widened).

    ``traced`` is model_a's `autoperm.frontend.TracedGraph` (default: ``alignment.traced``, else
    model_a is exported again); pass it when calling this in a loop."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r}: the weight of model_b must be a number in [0, 1]")
    if assignment not in ("forced", "adaptive"):
        raise ValueError(f"assignment={assignment!r}: choose 'forced' or 'adaptive'")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r}: a similarity in [-1, 1]")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is not supported with partial merging; choose one of "
                         f"{list(_NORMALIZE)}")
    from ..merge.regression import check_ridge

    check_ridge(ridge, normalize)
    spec = getattr(alignment, "spec", None)
    if spec is None:
        raise ValueError("alignment must be an autoperm.Alignment with its spec (from autoperm.match)")
    data = list(data) if data is not None else None
    if normalize is not None and not data:
        raise ValueError(f"normalize={normalize!r} measures activations and needs data=")
    tg, inputs = rewrite_graph(model_a, alignment, example_inputs, data, traced)
    compiled, sites = analyze_with_sites(tg)
    if [(g.name, g.size) for g in compiled.groups] != [(g.name, g.size) for g in spec.groups]:
        raise ValueError("the alignment's spec does not match model_a's traced graph; match the models again")
    gammas = _gammas(partial, [g.name for g in spec.groups])
    contraction, bad_c = contraction_dims(tg, spec)
    nonlocal_ops, bad_l = locality(tg, sites)
    frozen = {g: r for g, r in {**bad_l, **bad_c}.items() if buffer_count(gammas[g], spec.group(g).size) > 0}
    for g, r in frozen.items():
        log.info("partial merge: group %s is not widened: %s", g, r)
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    state_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    perms = alignment.perms
    if any(p.dim() == 2 for p in perms.values()):  # per-head head_dim: fold into B, keep one per group
        state_b, perms = absorb_children(spec, state_b, perms)
    while True:
        wanted = {g.name for g in spec.groups if g.name not in frozen and buffer_count(gammas[g.name], g.size) > 0}
        sims = _similarities(spec, tg, sites, wanted, state_a, state_b, perms, data, len(inputs), similarity)
        ext = {g.name: (extend_assignment(sims[g.name], buffer_count(gammas[g.name], g.size), mode=assignment,
                                          threshold=threshold) if g.name in wanted else keep_alignment(perms[g.name]))
               for g in spec.groups}
        try:
            module, tg_w, state = _build(model_a, tg, spec, sites, ext, contraction, state_a, state_b, alpha, inputs)
            break
        except WidenError as e:
            culprits = [g for g in e.groups if g in wanted]
            if not culprits:
                raise AutopermError(f"partial merge failed on a graph it cannot widen: {e}") from e
            for g in culprits:
                frozen[g] = f"widening could not be expressed: {e}"
                log.info("partial merge: group %s is not widened: %s", g, e)
    widths = {g: (spec.group(g).size, e.width) for g, e in ext.items()}
    widened = {g for g, (n, w) in widths.items() if w > n}
    local = {g: ops for g, ops in nonlocal_ops.items() if g in widened and ops}
    _self_check(model_a, module, tg, spec, sites, ext, contraction, state_a, state_b, inputs, exact=not local)
    if normalize == "regression":
        regress_widened(module, tg, tg_w, spec, ext, state_a, state_b, state, data, alpha, ridge)
    elif normalize is not None:
        normalize_widened(module, tg, tg_w, spec, ext, state_a, state_b, state, data, alpha, normalize)
    base = sum(p.numel() for p in model_a.parameters())
    params = [p for p in module.parameters()]
    merged_dims = _frozen_hidden(spec, model_a)
    result = PartialResult(module.train(model_a.training), widths, frozen, local, base,
                           sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params), merged_dims)
    log.info("partial merge: %d of %d groups widened, %+.1f%% parameters", len(widened), len(widths),
             100 * result.added)
    return result


def _build(model_a, tg, spec, sites, ext, contraction, state_a, state_b, alpha, inputs):
    """The widened module, and model_a's traced graph with the widened sizes (for REPAIR)."""
    n_lays = node_layouts(sites, spec)
    state = widen_state(state_a, state_b, param_layouts(spec), ext, contraction, float(alpha))
    tg_w, renamed = _copy_traced(tg)
    expected = patch_sizes(tg_w.graph, tg, n_lays, ext)
    tg_w.graph_module.recompile()
    check_shapes(tg_w, renamed, state, inputs, expected, n_lays)
    graph, consts = graph_from_traced(tg_w)
    with torch.no_grad():
        out = copy_module(model_a).eval()(*inputs)
    module = emit(graph, {**state, **consts}, buffers=buffer_keys(model_a), out_spec=output_spec(out),
                  static_batch=None if tg.dynamic_batch else inputs[0].shape[0], class_name="PartiallyMerged")
    return module, tg_w, state


def _frozen_hidden(spec, model: nn.Module) -> list[str]:
    """Reasons of frozen output channels of conv / linear / embedding layers (hidden units that
    are always merged), as in `autoperm.metrics.coverage`."""
    from ..metrics import _OUT_DIM

    out = set()
    for name, mod in model.named_modules():
        dim = next((d for cls, d in _OUT_DIM.items() if isinstance(mod, cls)), None)
        key = f"{name}.weight" if name else "weight"
        if dim is not None:
            out |= {f.reason for f in spec.frozen_of(key)
                    if f.dim == dim and f.reason != "model output" and not f.reason.startswith("embedding rows")}
    return sorted(out)


def _copy_traced(tg: TracedGraph) -> tuple[TracedGraph, dict[str, str]]:
    """A copy of ``tg`` with its own graph (fx may rename nodes: ``input`` -> ``input_1``), and
    the map new node name -> old node name."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(tg.graph, env))
    old_of = {new.name: old.name for old, new in env.items()}
    new_of = {o: n for n, o in old_of.items()}
    tg_w = dataclasses.replace(
        tg, graph_module=torch.fx.GraphModule(tg.graph_module, graph),
        state_keys={new_of[k]: v for k, v in tg.state_keys.items()},
        keyless={new_of[k]: v for k, v in tg.keyless.items()},
        user_inputs=[new_of[k] for k in tg.user_inputs],
        constants={new_of[k]: v for k, v in tg.constants.items()})
    return tg_w, old_of


@torch.no_grad()
def _self_check(model_a, module, tg, spec, sites, ext, contraction, state_a, state_b, inputs, exact) -> None:
    """The widened model at alpha = 0 must compute model A where the widened ops are unit-local
    (B's units then send nothing into merged units): a check of the widening itself."""
    if not any(e.split for e in ext.values()):
        return
    probe = copy_module(module)
    state0 = widen_state(state_a, state_b, param_layouts(spec), ext, contraction, 0.0)
    names = {v: k for k, v in getattr(module, "autoperm_keys", {}).items()}
    probe.load_state_dict({names.get(k, k): v for k, v in state0.items() if names.get(k, k) in probe.state_dict()},
                          strict=False)
    err = output_error(copy_module(model_a).eval()(*inputs), probe.eval()(*inputs))
    tol = 1e-9 if next(iter(state_a.values())).dtype == torch.float64 else 1e-4
    if exact and not err <= tol:
        raise AutopermError(f"partial merge self-check failed: at alpha=0 the widened model differs from "
                            f"model_a by {err:.2e} (relative) although every widened op is unit-local")
    log.info("partial merge self-check: alpha=0 vs model_a relative error %.2e%s", err,
             "" if exact else " (non-unit-local ops were widened: a gap is expected)")


def partial_merge(model_a: nn.Module, model_b: nn.Module, alignment, *, alpha: float = 0.5,
                  partial: float | Mapping[str, float] = 0.5, normalize: str | None = None,
                  data: Iterable | None = None, example_inputs: Any = None, assignment: str = "forced",
                  threshold: float = 0.0, similarity: str = "auto", ridge: float | None = None) -> nn.Module:
    """Partially merge ``model_b`` into ``model_a`` (see the module docstring): a new, wider module.

    ``partial`` is gamma, the share of buffer units per group (a number in [0, 1] or a dict
    ``{group name: gamma}``, missing groups 0). ``alignment`` comes from `autoperm.match`; its
    permutations are used as they are where gamma gives no buffer unit, so ``partial=0`` is the
    full merge. ``similarity`` ranks unit pairs for the extended assignment: ``"auto"`` uses
    activation correlations when ``data`` is given (as the thesis does), else the cosine of the
    units' weights. ``threshold`` is the adaptive assignment's epsilon. ``normalize`` in
    ``{None, "reset", "repair", "rescale", "regression"}`` needs ``data`` (``ridge``: regression's,
    `autoperm.merge`). Neither model is modified.
    """
    return partial_widen(model_a, model_b, alignment, alpha=alpha, partial=partial, normalize=normalize, data=data,
                         example_inputs=example_inputs, assignment=assignment, threshold=threshold,
                         similarity=similarity, ridge=ridge).module


from .partial_order import (Greedy, GreedyStep, benefit_factors, benefit_greedy, benefit_order,  # noqa: E402
                            widened_params)  # (re-exported)
