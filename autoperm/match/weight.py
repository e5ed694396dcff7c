"""Weight matching: permutation coordinate descent (Git Re-Basin; the Git Bi-sect reproduction,
../papers/001, section 4.1.2, which also fixes the stopping rule: stop when a full pass over the
groups changes no permutation). The descent itself, its cost matrices and their incremental
updates live in `autoperm.match.descent`; this module runs the starts and restarts.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import torch

from ..spec import PermGroup, PermutationSpec
from .assignment import solve_assignment, unit_matrix
from .descent import Descent, Timer, cost_work

__all__ = ["weight_matching", "unit_matrix", "solve_assignment", "last_profile"]

log = logging.getLogger(__name__)

#: Where the most recent `weight_matching` call spent its time, in seconds (``cost``: cost
#: matrices and their incremental updates; ``assignment``: linear assignments; ``objective``: the
#: exact objective at each start and the gain of each candidate assignment; ``setup``: copying and
#: permuting B per start), with counters (``passes``, ``assignments``, ``skipped``: groups not
#: re-solved because their cost did not change, ``trusted``: gains read off a cost matrix). For
#: benchmarks; on CUDA, kernels are asynchronous, so time may be booked to the next step that
#: waits for them.
last_profile: dict[str, float] = {}

_AUTO_TWO_STARTS = 2e9  # cost-matrix multiply-adds up to which ``starts=None`` runs two starts


def _factor_sharing(spec: PermutationSpec) -> list[PermGroup]:
    """Groups that share a dim with another group on another factor (heads and head_dim)."""
    owners: dict[tuple[str, int], set[str]] = {}
    for g in spec.groups:
        for ax in g.axes:
            owners.setdefault((ax.tensor, ax.dim), set()).add(g.name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    return [g for g in spec.groups if g.name in shared and any(ax.outer > 1 or ax.inner > 1 for ax in g.axes)]


def weight_matching(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_iter: int = 100, init: Mapping[str, torch.Tensor] | None = None,
                    progress=None, starts: int | None = None,
                    tol: float = 0.0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Permutations for ``b`` maximizing ``sum <A, P(B)>``, and the objective after each pass.

    Groups are visited in a random order per pass (``torch.Generator().manual_seed(seed)``).
    The descent starts from the identity; with ``starts=2`` a second, greedy start is run too,
    whose first pass solves each group with the dims of groups not visited yet summed out (their
    permutations are unknown, so their slots carry only noise), and the better result is kept.
    It costs two to three times the time for a small gain on random pairs (ResNet-50: objective
    56888 instead of 56865). ``starts=None`` (the default) picks 2 when building every cost
    matrix once takes at most ``_AUTO_TWO_STARTS`` multiply-adds (well under a second; the test
    zoo and the digits models) and 1 above (ResNet-50: 3.9e10); and when every tensor of B has
    the norm of A's (the signature of a permuted copy, whose optimum is the upper bound
    ``|A| |B|``) but the result fell short of that bound, it also runs an *independent* invariant
    start, whose first pass solves every group with the dims and factors of all the other groups
    summed out, so that no wrong guess can mislead another group. That start recovers permuted
    copies where the others get stuck: on random inits BatchNorm / LayerNorm weights of one and
    biases of zero carry no signal, and the descent from a fully scrambled B settled with most
    groups wrong (torchvision mobilenet_v3_small, efficientnet_b0, timm deit_tiny).
    Groups that share a dim on different factors (attention heads and head_dim, a grouped conv's
    group index and within-group units) trap plain coordinate descent: with head_dim wrong, no
    head assignment scores well. So after a first descent those groups are re-solved with a cost
    that sums out the dim's other factors (invariant to the other group), and the descent is run
    again from there; the better of the two results is kept. A descent stops, and the later
    starts and the restart are skipped, once the objective reaches the upper bound ``|A| |B|``
    (Cauchy-Schwarz: B is then a permuted copy of A, up to scale, and nothing can score more).
    The invariant start sorts units whose invariant features are A's in another order instead of
    solving an assignment (a self-permuted torchvision vit_b_16 at 64x64: 154 s -> 29 s).
    ``tol`` (default 0: run until a pass changes no permutation, the stopping rule of the Git
    Bi-sect reproduction) stops a descent once a pass gains less than ``tol`` times the objective;
    ``max_iter`` caps the passes per descent (the first pass alone already beats snimu's rebasin
    on ResNet-50: `benchmarks/results/match_speed.md`).
    ``progress`` (optional) is called as ``progress(pass_number, objective)`` after each pass.
    Runs on the tensors' device; float32 tensors are multiplied in float32 and summed in float64.
    Where the time went is left in `last_profile`.
    """
    if starts is not None and (isinstance(starts, bool) or starts not in (1, 2)):
        raise ValueError(f"starts={starts!r}: pass 1 (identity start) or 2 (also the greedy start)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise ValueError(f"tol={tol!r}: pass a number in [0, 1) (the relative gain per pass below which to stop)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r}: pass a positive number of passes")
    auto = starts is None
    if starts is None:
        starts = 2 if sum(cost_work(spec, a).values()) <= _AUTO_TWO_STARTS else 1
    profile: dict[str, float] = {"starts": starts}
    last_profile.clear()
    t0 = time.perf_counter()
    start = {g.name: (init[g.name].clone() if init else torch.arange(g.size)) for g in spec.groups}
    state = Descent(spec, a, b, start, profile)
    history = state.run(seed, max_iter, progress, tol=tol)
    perms = dict(state.perms)
    if history and history[-1] >= (1 - 1e-12) * state.bound():
        log.info("weight matching: the objective reached its upper bound |A| |B|; nothing can do better")
        return _finish(perms, history, profile, t0)
    copy_like = _norms_match(state.norms)
    if init is None and starts == 2:  # a second start whose first pass ignores what is not solved yet
        state = Descent(spec, a, b, start, profile)
        history2 = state.run(seed, max_iter, progress, first_pass_invariant="sequential", tol=tol)
        if history2[-1] > history[-1]:
            perms, history = dict(state.perms), history + history2
    if init is None and auto and copy_like and history[-1] < (1 - 1e-9) * state.bound():
        log.info("weight matching: B's tensors have A's norms (a permuted copy?) but the objective fell short of "
                 "|A| |B|; running the independent invariant start too")
        profile["starts"] = starts + 1
        state = Descent(spec, a, b, start, profile)
        history2 = state.run(seed, max_iter, progress, first_pass_invariant="independent", tol=tol)
        if history2[-1] > history[-1]:
            perms, history = dict(state.perms), history + history2
    sharing = _factor_sharing(spec)
    if sharing and history[-1] >= (1 - 1e-9) * state.bound():
        log.info("weight matching: the objective reached its upper bound |A| |B|; no restart needed")
        sharing = []
    if sharing:
        state = Descent(spec, a, b, perms, profile)
        for g in sorted(sharing, key=lambda g: min(ax.inner for ax in g.axes)):
            others = frozenset(h.name for h in sharing if h is not g)
            cost = state.full_cost(g, others)
            with Timer(profile, "assignment"):
                r = solve_assignment(cost)
            state.assign(g, state.perms[g.name][r])
        history2 = state.run(seed + 1, max_iter, progress, tol=tol)
        if history2 and history2[-1] > history[-1]:
            perms, history = dict(state.perms), history + history2
    return _finish(perms, history, profile, t0)


def _norms_match(norms: Mapping[str, tuple[float, float]], rtol: float = 1e-6) -> bool:
    """Whether every tensor of B has the norm of A's (within ``rtol``): true of a permuted copy."""
    return bool(norms) and all(abs(x - y) <= rtol * max(x, y, 1e-30) for x, y in norms.values())


def _finish(perms, history, profile, t0):
    profile["total"] = time.perf_counter() - t0
    last_profile.update(profile)
    log.info("weight matching: %.2f s (cost %.2f, assignment %.2f, objective %.2f, setup %.2f); "
             "%d passes, %d assignments, %d skipped", profile["total"], profile.get("cost", 0.0),
             profile.get("assignment", 0.0), profile.get("objective", 0.0), profile.get("setup", 0.0),
             profile.get("passes", 0), profile.get("assignments", 0), profile.get("skipped", 0))
    return perms, history
