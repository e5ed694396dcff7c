"""The state of one weight-matching coordinate descent (`autoperm.match.weight`).

For one group, with every other permutation held fixed, the objective
``sum over tensors <W_A, P(W_B)>`` is linear in the group's permutation: its cost matrix
``C[i, j]`` sums, over the group's axes, the inner product of unit i of A with unit j of B (B's
other axes already permuted), so one linear assignment solves it exactly. Axis layouts are
honoured: after a flatten each unit is a block of ``inner`` slots, after a fused qkv the unit
repeats in each of ``outer`` slices, and all of those slots count.

Performance: B is kept permuted by every current permutation, and every group's cost matrix is
kept up to date *incrementally*. When group h changes only the units S it moved change in B, so
each other group g on the same tensors gets ``C_g += A[S] . (B_new[S] - B_old[S])`` (a product
over the moved slots only) instead of a product over whole tensors (a cost matrix whose updates
since its last build would cost more than a rebuild is rebuilt instead, in one matrix product
over all its axes); a group whose cost matrix did not change since it was last solved is not
solved again; the objective is updated by the gain of each accepted assignment instead of
permuting the whole state dict per pass: read off the cost matrix when it is large (above
``_TRUST`` of ``|A| |B|`` on the group's tensors, far above the rounding of float32 products),
else computed exactly (``<A[S], B_new[S] - B_old[S]>`` in float64, over the moved slots only)
and the assignment kept only if that is positive. Products run in the tensors' dtype (float32
models: float32 products, float64 sums), on the tensors' device; only the assignment goes to
the CPU.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import torch

from .._progress import progress as _progress_bar
from ..permute import apply_axis, unit_rows
from ..spec import Axis, PermGroup, PermutationSpec
from .assignment import solve_assignment

__all__ = ["Descent", "Timer", "cost_work"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 24  # elements of cost-matrix product per matrix multiplication (bounds the memory used)
_TRUST = 1e-3  # a gain read off a cost matrix above this share of |A||B| is accepted without an exact check


def _inverse(p: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device, dtype=p.dtype)
    return inv


def _slots(axis: Axis, size: int, units: torch.Tensor) -> torch.Tensor:
    """Indices along ``axis.dim`` of the slots owned by ``units``, ordered (outer, unit, inner)."""
    dev = units.device
    outer = torch.arange(axis.outer, device=dev).view(-1, 1, 1) * (size * axis.inner)
    inner = torch.arange(axis.inner, device=dev).view(1, 1, -1)
    return (axis.offset + outer + units.view(1, -1, 1) * axis.inner + inner).reshape(-1)


def _overlap(x: Axis, y: Axis, size_x: int, size_y: int) -> bool:
    return not (x.offset + x.extent(size_x) <= y.offset or y.offset + y.extent(size_y) <= x.offset)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Timer:
    def __init__(self, profile: dict, key: str):
        self.profile, self.key = profile, key

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.profile[self.key] = self.profile.get(self.key, 0.0) + time.perf_counter() - self.t0


class Descent:
    """The state of one coordinate descent: B permuted by the current permutations, each group's
    cost matrix (float64; column k is B's unit now at position k, i.e. ``C_g[:, p_g]`` in the
    terms of the module docstring; ``None`` when stale), which groups are solved for their current
    cost, and the objective."""

    def __init__(self, spec: PermutationSpec, a, b, perms: Mapping[str, torch.Tensor], profile: dict):
        self.spec, self.profile = spec, profile
        self.axes: dict[str, list[tuple[PermGroup, int, Axis]]] = {}
        for g in spec.groups:
            for k, ax in enumerate(g.axes):
                self.axes.setdefault(ax.tensor, []).append((g, k, ax))
        with Timer(profile, "setup"):
            self.a = {t: a[t].detach().to(_compute_dtype(a[t])) for t in self.axes}
            self.device = next(iter(self.a.values())).device if self.a else torch.device("cpu")
            self.perms = {g.name: perms[g.name].detach().cpu().long().clone() for g in spec.groups}
            self.dtype = {g.name: torch.float64 if any(self.a[ax.tensor].dtype == torch.float64 for ax in g.axes)
                          else torch.float32 for g in spec.groups}
            moved = {g.name for g in spec.groups if not torch.equal(self.perms[g.name], torch.arange(g.size))}
            self.bp = {}
            for t, items in self.axes.items():
                x = b[t].detach().to(self.a[t].dtype).clone()
                for g, _, ax in items:
                    if g.name in moved:
                        x = apply_axis(x, ax, self.perms[g.name].to(self.device))
                self.bp[t] = x
        self.cost: dict[str, torch.Tensor | None] = {g.name: None for g in spec.groups}
        self.clean: set[str] = set()
        # work (multiply-adds) of building a cost from scratch, and of the updates since the last build
        self.work = cost_work(spec, self.a)
        self.spent = {g.name: 0 for g in spec.groups}
        # groups acting on some tensor twice: their objective is not linear in their permutation
        self.twice = {g.name for g in spec.groups if len({ax.tensor for ax in g.axes}) < len(g.axes)}
        with Timer(profile, "objective"):
            # |A_t| and |B_t| (B's norm does not change under permutation)
            self.norms = {t: (float(torch.linalg.vector_norm(self.a[t], dtype=torch.float64)),
                              float(torch.linalg.vector_norm(self.bp[t], dtype=torch.float64))) for t in self.axes}
        # |A_t| |B_t| summed over the group's tensors: bounds every cost-matrix sum of the group
        self.scale = {g.name: sum(self.norms[t][0] * self.norms[t][1] for t in {ax.tensor for ax in g.axes})
                      for g in spec.groups}
        self.objective = self.exact_objective()

    def exact_objective(self) -> float:
        """``sum over the spec's tensors of <A, P(B)>`` from scratch (float64)."""
        with Timer(self.profile, "objective"):
            return float(sum(torch.dot(self.a[t].reshape(-1).double(), self.bp[t].reshape(-1).double())
                             for t in self.axes)) if self.axes else 0.0

    def _product(self, g: PermGroup, pairs, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out + sum_k ua_k @ ub_k.T`` over (ua, ub) unit-row pairs (``out`` is float64 and is
        added to in place; a new zero matrix without it), with as few matrix products in the
        group's dtype as fit in ``_CHUNK`` elements."""
        if out is None:
            out = torch.zeros(g.size, g.size, dtype=torch.float64, device=self.device)
        dtype = self.dtype[g.name]
        batch: list[tuple[torch.Tensor, torch.Tensor]] = []
        width = 0
        for i, (ua, ub) in enumerate(pairs):
            batch.append((ua.to(dtype), ub.to(dtype)))
            width += ua.shape[1]
            if width * g.size >= _CHUNK or i == len(pairs) - 1:
                if len(batch) == 1:
                    out.add_(batch[0][0] @ batch[0][1].T)
                else:
                    out.add_(torch.cat([x for x, _ in batch], 1) @ torch.cat([y for _, y in batch], 1).T)
                batch, width = [], 0
        return out

    def bound(self) -> float:
        """``|A| |B|`` over the spec's tensors: no permutation scores more (Cauchy-Schwarz)."""
        with Timer(self.profile, "objective"):
            na = sum(x * x for x, _ in self.norms.values())
            nb = sum(y * y for _, y in self.norms.values())
        return (na * nb) ** 0.5

    def full_cost(self, g: PermGroup, unknown: frozenset[str] = frozenset()) -> torch.Tensor:
        """The group's cost matrix from scratch; dims and factors where a group in ``unknown``
        acts are summed out (their permutations are not known yet)."""
        with Timer(self.profile, "cost"):
            return self._product(g, self.unit_pairs(g, unknown))

    def unit_pairs(self, g: PermGroup, unknown: frozenset[str] = frozenset()) -> list:
        """(A's, B's) unit rows of each of g's axes, ``[g.size, features]``; dims and factors
        where a group in ``unknown`` acts are summed out."""
        pairs = []
        for ax in g.axes:
            others = [x for h, _, x in self.axes[ax.tensor] if h.name in unknown and h is not g]
            sum_dims = {x.dim for x in others if x.dim != ax.dim}
            sum_factors = any(x.dim == ax.dim for x in others)
            pairs.append((unit_rows(self.a[ax.tensor], ax, g.size, sum_dims, sum_factors),
                          unit_rows(self.bp[ax.tensor], ax, g.size, sum_dims, sum_factors)))
        return pairs

    def cost_of(self, g: PermGroup) -> torch.Tensor:
        if self.cost[g.name] is None:
            self.cost[g.name] = self.full_cost(g)
            self.spent[g.name] = 0
        return self.cost[g.name]

    def assign(self, g: PermGroup, new: torch.Tensor, predicted: float | None = None) -> float:
        """Set group g's permutation to ``new``: move the changed slots of B in place, update the
        cost matrices of the groups sharing those tensors, and return the exact objective gain
        (or ``predicted``, the gain read off the group's cost matrix, when the caller trusts it)."""
        gain = 0.0
        q = _inverse(self.perms[g.name])[new].to(self.device)  # B_new[i] = B_old[q[i]] on each axis
        moved = torch.nonzero(q != torch.arange(g.size, device=self.device)).flatten()
        if moved.numel() == 0:
            return 0.0
        deltas: dict[str, list] = {}
        self_touch = False
        for k, ax in enumerate(g.axes):
            t, dim = ax.tensor, ax.dim
            idx = _slots(ax, g.size, moved)
            new_s = self.bp[t].index_select(dim, _slots(ax, g.size, q[moved]))
            old_s = self.bp[t].index_select(dim, idx)
            a_s = None
            if predicted is None:
                with Timer(self.profile, "objective"):
                    a_s = self.a[t].index_select(dim, idx)
                    gain += float(torch.dot(a_s.reshape(-1).double(),
                                            new_s.reshape(-1).double() - old_s.reshape(-1).double()))
            with Timer(self.profile, "cost"):
                d = new_s - old_s
                for h, kh, bx in self.axes[t]:
                    if (h is g and kh == k) or (bx.dim == dim and not _overlap(ax, bx, g.size, h.size)):
                        continue
                    self.clean.discard(h.name)
                    if h is g:
                        self_touch = True  # the group acts twice on this tensor: its cost is not linear
                    elif self.cost[h.name] is not None:
                        self.spent[h.name] += d.numel() * h.size
                        if bx.dim == dim or self.spent[h.name] > self.work[h.name]:
                            self.cost[h.name] = None  # rebuilding it on the next visit is cheaper (or needed)
                            deltas.pop(h.name, None)
                        else:
                            if a_s is None:
                                a_s = self.a[t].index_select(dim, idx)
                            deltas.setdefault(h.name, []).append((unit_rows(a_s, bx, h.size), unit_rows(d, bx, h.size)))
                self.bp[t].index_copy_(dim, idx, new_s)
        with Timer(self.profile, "cost"):
            for name, pairs in deltas.items():
                if self.cost[name] is not None:
                    self._product(self.spec.group(name), pairs, self.cost[name])
            if self_touch:
                self.cost[g.name] = None
            elif self.cost[g.name] is not None:
                self.cost[g.name] = self.cost[g.name][:, q]
        self.perms[g.name] = new.clone()
        gain = gain if predicted is None else predicted
        self.objective += gain
        return gain

    def solve(self, g: PermGroup, unknown: frozenset[str] | None = None) -> tuple[bool, float]:
        """One coordinate step on group g; returns (changed, gain). With ``unknown`` the cost sums
        out the dims of those groups and is not kept."""
        if unknown is None:
            if g.name in self.clean:
                self.profile["skipped"] = self.profile.get("skipped", 0) + 1
                return False, 0.0
            cost = self.cost_of(g)
        else:
            cost = self.full_cost(g, unknown)
        t0 = time.perf_counter()
        with Timer(self.profile, "assignment"):
            r = solve_assignment(cost)
        log.debug("assignment %s size %d: %.3f s", g.name, g.size, time.perf_counter() - t0)
        self.profile["assignments"] = self.profile.get("assignments", 0) + 1
        if unknown is None:
            self.clean.add(g.name)
        old = self.perms[g.name]
        if torch.equal(r, torch.arange(g.size)):
            return False, 0.0
        diag = torch.arange(g.size, device=cost.device)
        total = float(cost[diag, r.to(cost.device)].sum())
        scale = max(1.0, abs(total))
        if unknown is None and g.name not in self.twice:
            # the cost matrix is exact here, up to the rounding of float32 products (relative
            # error far below 1e-4 of |A||B| on the group's tensors): a gain well above that is
            # read off the matrix, sparing a pass over every moved slot; smaller ones are checked
            predicted = total - float(cost[diag, diag].sum())
            if predicted > _TRUST * max(1.0, self.scale[g.name]):
                self.profile["trusted"] = self.profile.get("trusted", 0) + 1
                return True, self.assign(g, old[r], predicted)
        gain = self.assign(g, old[r])
        if gain > 1e-12 * scale:
            return True, gain
        self.assign(g, old)  # a tie or rounding: keep the old permutation
        if unknown is None:
            self.clean.add(g.name)
        return False, 0.0

    def solve_invariant(self, g: PermGroup, others: frozenset[str]) -> bool:
        """Group g's assignment on a cost that sums out every dim and factor of the groups in
        ``others`` (features invariant to their permutations, so what they are set to does not
        matter), taken whatever the objective does meanwhile: a start for the descent, not a
        descent step. For a permuted copy of A it is g's true permutation wherever g's units
        differ in those features, whatever the other groups' guesses. Where B's features are
        A's in another order (a permuted copy), sorting finds that order in O(n log n) and it is
        optimal (``sum <a_i, a_p(i)> <= sum |a_i|^2``); the assignment is solved otherwise (a
        low-rank invariant cost made the assignment of a 3072-unit ViT MLP take 9 s)."""
        with Timer(self.profile, "cost"):
            pairs = self.unit_pairs(g, others)
            r = same_rows_order(pairs)
        if r is None:
            with Timer(self.profile, "cost"):
                cost = self._product(g, pairs)
            with Timer(self.profile, "assignment"):
                r = solve_assignment(cost)
            self.profile["assignments"] = self.profile.get("assignments", 0) + 1
        else:
            self.profile["sorted"] = self.profile.get("sorted", 0) + 1
        if torch.equal(r, torch.arange(g.size)):
            return False
        self.assign(g, self.perms[g.name][r])
        return True

    def run(self, seed: int, max_iter: int, progress, first_pass_invariant: str | None = None,
            tol: float = 0.0) -> list[float]:
        """Coordinate descent over the groups in a seeded random order per pass, until a pass
        changes nothing (or, with ``tol > 0``, gains less than ``tol`` times the objective's
        magnitude after the first pass, or the objective reaches the upper bound `bound`);
        returns the objective after each pass.
        ``first_pass_invariant="sequential"``: the first pass solves each group with the dims of
        the groups not visited yet summed out (their slots carry only noise so far), as a descent
        step; ``"independent"``: it sets every group by `solve_invariant` with *every* other
        group summed out (no group's guess can mislead another's; the start that recovers
        permuted copies where the others get stuck), and the descent starts from there."""
        if first_pass_invariant not in (None, "sequential", "independent"):
            raise ValueError(f"first_pass_invariant={first_pass_invariant!r}: None, 'sequential' or 'independent'")
        gen = torch.Generator().manual_seed(int(seed))
        history: list[float] = []
        groups = self.spec.groups
        names = frozenset(g.name for g in groups)
        unknown = set(names) if first_pass_invariant == "sequential" else set()
        bound = self.bound()
        for it in _progress_bar(range(max_iter), desc="weight matching passes", total=max_iter):
            changed = False
            for gi in torch.randperm(len(groups), generator=gen).tolist():
                g = groups[gi]
                if first_pass_invariant == "independent" and it == 0:
                    changed |= self.solve_invariant(g, names - {g.name})
                elif unknown:
                    unknown.discard(g.name)
                    step_changed, _ = self.solve(g, frozenset(unknown))
                    changed |= step_changed
                else:
                    step_changed, _ = self.solve(g)
                    changed |= step_changed
            unknown = set()
            history.append(self.objective)
            self.profile["passes"] = self.profile.get("passes", 0) + 1
            log.info("weight matching pass %d: objective %.6g", it + 1, history[-1])
            if progress is not None:
                progress(it + 1, history[-1])
            if not changed and not (first_pass_invariant == "independent" and it == 0):  # it only starts a descent
                break
            if history[-1] >= (1 - 1e-6) * bound and self.exact_objective() >= (1 - 1e-12) * bound:
                # Cauchy-Schwarz: no pass can gain any more (the running sum of gains carries
                # rounding, so the exact value decides)
                log.info("weight matching: pass %d reached the upper bound |A| |B|; stopping", it + 1)
                break
            if tol > 0 and len(history) > 1 and history[-1] - history[-2] < tol * abs(history[-2]):
                log.info("weight matching: pass %d gained less than tol=%g of the objective; stopping", it + 1, tol)
                break
        # the per-pass values add up exact gains; re-anchor them on the exact final value, so
        # that equal permutations score equal objectives whatever path reached them
        exact = self.exact_objective()
        history = [h + (exact - self.objective) for h in history]
        self.objective = exact
        return history


def same_rows_order(pairs, rtol: float = 1e-5) -> torch.Tensor | None:
    """The order r with ``b[r[i]] == a[i]`` (within ``rtol`` of the largest entry) on every
    ``(a, b)`` pair of unit rows when B's units are A's permuted, else None; found by sorting
    both on one random projection of all their features, in O(n log n).

    >>> a = torch.randn(5, 3); same_rows_order([(a, a[[2, 0, 1, 4, 3]])]).tolist()
    [1, 2, 0, 4, 3]
    """
    gen = torch.Generator().manual_seed(0)
    ka = kb = None
    for a, b in pairs:
        if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return None
        key = torch.randn(a.shape[1], dtype=torch.float64, generator=gen).to(a.device)
        pa, pb = a.double() @ key, b.double() @ key
        ka, kb = (pa, pb) if ka is None else (ka + pa, kb + pb)
    if ka is None or ka.numel() == 0:
        return None
    ia, ib = torch.argsort(ka), torch.argsort(kb)
    scale = max(float(a.abs().max()) for a, _ in pairs if a.numel())
    if scale == 0 or any(float((a[ia] - b[ib]).abs().max()) > rtol * scale for a, b in pairs if a.numel()):
        return None
    r = torch.empty_like(ia)
    r[ia] = ib
    return r.cpu()


def cost_work(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Multiply-adds of building each group's cost matrix from scratch."""
    return {g.name: g.size * sum(state[ax.tensor].numel() * ax.extent(g.size) // state[ax.tensor].shape[ax.dim]
                                 for ax in g.axes) for g in spec.groups}
