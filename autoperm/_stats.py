"""Streaming float64 statistics of the units of each group, computed over data by running the
traced ATen graph with an fx Interpreter (forward hooks cannot see values inside a module, such
as q / k after a reshape, or the sum on a residual stream).

For two models run on the same batches, `PairStats` accumulates per group the means, second
moments and the cross moment ``E[a b^T]`` of the unit features over every site where the group
appears; memory is proportional to the sum of size^2 over groups, not to the amount of data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ._data import stat_inputs
from ._progress import progress as _progress
from .analysis import Site
from .frontend import TracedGraph
from .permute import apply_axis, unit_rows
from .spec import Axis

__all__ = ["run_graph", "unit_features", "shared_sites", "PairStats", "pair_statistics"]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.seen[n.name] = out
        return out


@torch.no_grad()
def run_graph(tg: TracedGraph, state: Mapping[str, torch.Tensor], inputs: tuple[torch.Tensor, ...],
              wanted: set[str]) -> dict[str, torch.Tensor]:
    """Run the traced graph with the tensors of ``state`` (a state dict) on ``inputs``; return
    the outputs of the nodes named in ``wanted``."""
    args, user = [], iter(inputs)
    for node in tg.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in tg.state_keys:
            args.append(state[tg.state_keys[node.name]])
        elif node.name in tg.constants:
            args.append(tg.constants[node.name])
        else:
            args.append(next(user))
    rec = _Recorder(tg.graph_module, wanted)
    rec.run(*args)
    return rec.seen


def unit_features(t: torch.Tensor, site: Site, size: int, sum_dims=(), sum_factors: bool = False) -> torch.Tensor:
    """The values of a site as ``(samples, size)`` in float64: every other index is a sample
    (after summing out ``sum_dims`` / the site's own factors, see `autoperm.permute.unit_rows`)."""
    return unit_rows(t, _site_axis(site), size, sum_dims, sum_factors).T.double()


def _site_axis(site: Site) -> Axis:
    return Axis("", site.dim, site.offset, site.outer, site.inner)


def shared_sites(sites: Mapping[str, list[Site]]) -> dict[str, list[tuple[str, Site]]]:
    """node -> the (group, site) pairs there, for nodes where two or more groups act."""
    where: dict[str, list[tuple[str, Site]]] = {}
    for g, ss in sites.items():
        for s in ss:
            where.setdefault(s.node, []).append((g, s))
    return {k: v for k, v in where.items() if len({g for g, _ in v}) > 1}


@dataclass
class PairStats:
    """Running sums for one group of ``size`` units in models A and B."""

    size: int
    count: int = 0
    sum_a: torch.Tensor = field(default=None)
    sum_b: torch.Tensor = field(default=None)
    sq_a: torch.Tensor = field(default=None)
    sq_b: torch.Tensor = field(default=None)
    cross: torch.Tensor = field(default=None)

    def __post_init__(self) -> None:
        z = torch.zeros(self.size, dtype=torch.float64)
        self.sum_a, self.sum_b, self.sq_a, self.sq_b = z.clone(), z.clone(), z.clone(), z.clone()
        self.cross = torch.zeros(self.size, self.size, dtype=torch.float64)

    def update(self, fa: torch.Tensor, fb: torch.Tensor) -> None:
        fa, fb = fa.cpu(), fb.cpu()
        self.count += fa.shape[0]
        self.sum_a += fa.sum(0)
        self.sum_b += fb.sum(0)
        self.sq_a += (fa * fa).sum(0)
        self.sq_b += (fb * fb).sum(0)
        self.cross += fa.T @ fb

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """``corr[i, j]`` between unit i of A and unit j of B."""
        n = max(self.count, 1)
        ma, mb = self.sum_a / n, self.sum_b / n
        sa = (self.sq_a / n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sq_b / n - mb * mb).clamp_min(0).sqrt()
        cov = self.cross / n - torch.outer(ma, mb)
        return cov / (torch.outer(sa, sb) + eps)


def pair_statistics(tg: TracedGraph, sites: Mapping[str, list[Site]], sizes: Mapping[str, int],
                    state_a, state_b, data: Iterable, n_inputs: int = 1, progress=None,
                    b_perms: Mapping[str, torch.Tensor] | None = None) -> dict[str, PairStats]:
    """Stream ``data`` through both models (as the traced graph) and accumulate `PairStats`.

    Where several groups act on one site (heads and head_dim), a group's features there are made
    invariant to the others (their dims or factors summed out), unless ``b_perms`` gives the other
    groups' permutations: then B's values are permuted by them first and full features are used.
    Passes over data report through `autoperm._progress.progress`; ``progress``, if given, is
    also called with the number of batches done.
    """
    stats = {g: PairStats(sizes[g]) for g in sites if sites[g]}
    shared = shared_sites(sites)
    wanted = {s.node for g in stats for s in sites[g]}
    batches = 0
    for batch in _progress(data, desc="activation statistics"):
        x = stat_inputs(batch, n_inputs, "activation statistics")
        out_a = run_graph(tg, state_a, x, wanted)
        out_b = run_graph(tg, state_b, x, wanted)
        for g, st in stats.items():
            for s in sites[g]:
                ta, tb = out_a[s.node], out_b[s.node]
                others = [(h, o) for h, o in shared.get(s.node, []) if h != g]
                sum_dims, sum_factors = set(), False
                if others and b_perms is None:  # invariant to the other groups here
                    sum_dims = {o.dim for _, o in others if o.dim != s.dim}
                    sum_factors = any(o.dim == s.dim for _, o in others)
                elif others:
                    for h, o in others:
                        tb = apply_axis(tb, _site_axis(o), b_perms[h])
                st.update(unit_features(ta, s, st.size, sum_dims, sum_factors),
                          unit_features(tb, s, st.size, sum_dims, sum_factors))
        batches += 1
        if progress is not None:
            progress(batches)
    if batches == 0:
        raise ValueError("activation statistics need at least one batch in data")
    return stats
