"""Activation matching: correlate the units of A and B over data, one assignment per group
(Git Re-Basin's activation matching; the Git Bi-sect reproduction, ../papers/001, section 4.1.1,
finds pre-activation features better than post-activation ones, so they are the default).

Features are collected at every site where a group appears (`autoperm.analysis.Site`): with
``features="pre"`` the outputs of convs, linears and other products; with ``"all"`` also the
normalized, activated and summed values (residual streams). Statistics stream in float64
(`autoperm._stats`); the correlation (not the raw dot product) is maximized. Where groups share
a dim (heads and head_dim), a first pass uses features invariant to the other groups and a second
pass the full features with B permuted by the first answers.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch

from .._stats import pair_statistics, shared_sites
from ..analysis import Site
from ..frontend import TracedGraph
from ..spec import PermutationSpec
from .assignment import solve_assignment

__all__ = ["activation_matching", "select_sites"]

log = logging.getLogger(__name__)


def select_sites(sites: Mapping[str, list[Site]], features: str) -> dict[str, list[Site]]:
    """Pre-activation sites of each group, falling back to all its sites where it has none."""
    if features not in ("pre", "all"):
        raise ValueError(f"features={features!r}: choose 'pre' (pre-activation) or 'all'")
    out = {}
    for g, ss in sites.items():
        pre = [s for s in ss if s.producer]
        out[g] = ss if (features == "all" or not pre) else pre
    return out


def activation_matching(spec: PermutationSpec, tg: TracedGraph, sites: Mapping[str, list[Site]],
                        state_a, state_b, data: Iterable, *, features: str = "pre",
                        n_inputs: int = 1) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Permutations for B from unit correlations; ``history`` holds the mean matched correlation."""
    chosen = select_sites(sites, features)
    sizes = {g.name: g.size for g in spec.groups}
    data = list(data) if shared_sites(chosen) else data  # a second pass follows
    stats = pair_statistics(tg, chosen, sizes, state_a, state_b, data, n_inputs)
    perms, scores = _assign(spec, stats)
    sharing = {g for pairs in shared_sites(chosen).values() for g, _ in pairs}
    if sharing:  # second pass: full features, B permuted by the other groups' first answers
        again = {g: ss for g, ss in chosen.items() if g in sharing}
        stats.update(pair_statistics(tg, again, sizes, state_a, state_b, data, n_inputs, b_perms=perms))
        perms, scores = _assign(spec, stats)
    return perms, [sum(scores) / max(len(scores), 1)]


def _assign(spec: PermutationSpec, stats) -> tuple[dict[str, torch.Tensor], list[float]]:
    perms, scores = {}, []
    for g in spec.groups:
        if g.name not in stats:
            log.info("group %s never appears in an activation: left unpermuted", g.name)
            perms[g.name] = torch.arange(g.size)
            continue
        corr = torch.nan_to_num(stats[g.name].correlation())
        perms[g.name] = solve_assignment(corr)
        scores.append(corr[torch.arange(g.size), perms[g.name]].mean().item())
    return perms, scores
