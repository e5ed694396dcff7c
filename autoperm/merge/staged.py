"""Run a traced graph over every batch at once, node by node, so that a caller can stop at a
node, change a state tensor the rest of the graph reads, and go on: one pass over the data for
corrections that REPAIR would otherwise measure with one full pass per layer
(`autoperm.merge.repair.repair_state`).

Values are freed after their last use, so memory is the values live at the current node, for
every batch together; where a node's values would take that past ``max_bytes`` (``None``: no
limit), the run gives up (`StagedTooLarge`, raised after that node's first batch) and the caller
falls back to one pass per layer. A forward that draws random numbers draws them in another
order than separate passes would.
"""

from __future__ import annotations

from typing import Callable, Mapping, TypeVar

import torch

from ..frontend import TracedGraph

__all__ = ["StagedRun", "StagedTooLarge", "try_one_pass", "out_of_memory", "STAGED_BYTES"]

STAGED_BYTES = 2 << 30  # values held at once over all batches by a one-pass correction, before it falls back


class StagedTooLarge(RuntimeError):
    """The values live at some node, over all batches, exceed the run's ``max_bytes``."""


T = TypeVar("T")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch running out of (device or host) memory."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def try_one_pass(attempt: Callable[[], T], why: str | None) -> tuple[T | None, str | None]:
    """``(attempt(), None)``, or ``(None, reason)`` when ``why`` already gives a reason not to try,
    or the attempt gave up (`StagedTooLarge`) or ran out of memory: the caller then falls back
    to a pass per layer. Other errors propagate."""
    if why is not None:
        return None, why
    try:
        return attempt(), None
    except StagedTooLarge as e:
        return None, str(e)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        return None, f"out of memory ({str(e).splitlines()[0]})"


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class StagedRun:
    """The traced graph run on ``batches`` (tuples of input tensors) with ``state``, up to a
    node at a time.

    Example::

        run = StagedRun(tg, state, [(x1,), (x2,)])
        outs = run.advance_to("conv2d_3")          # that node's value per batch
        run.set_state("layer1.0.conv1.weight", w)  # read by nodes not run yet, and by rerun()
        outs = run.rerun("conv2d_3")
    """

    def __init__(self, tg: TracedGraph, state: Mapping[str, torch.Tensor], batches: list[tuple],
                 max_bytes: int | None = None) -> None:
        self.nodes = list(tg.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.max_bytes = max_bytes
        self.last_use: dict[torch.fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        # placeholder node(s) reading each state key
        self.holders: dict[str, list[torch.fx.Node]] = {}
        self.interps = []
        for x in batches:
            it = torch.fx.Interpreter(tg.graph_module, garbage_collect_values=False)
            user = iter(x)
            for n in self.nodes:
                if n.op != "placeholder":
                    continue
                if n.name in tg.state_keys:
                    it.env[n] = state[tg.state_keys[n.name]]
                elif n.name in tg.constants:
                    it.env[n] = tg.constants[n.name]
                else:
                    it.env[n] = next(user)
            self.interps.append(it)
        for n in self.nodes:
            if n.op == "placeholder" and n.name in tg.state_keys:
                self.holders.setdefault(tg.state_keys[n.name], []).append(n)
        self.pos = 0  # nodes before this index have run
        self.live = 0  # bytes of the values held (state tensors and inputs not counted)
        self.pending: list[torch.fx.Node] = []  # inputs of the last stop node, past their last use

    @torch.no_grad()
    def advance_to(self, name: str) -> list:
        """Run every node up to and including ``name`` (if not run yet); its value per batch.
        Raises `StagedTooLarge` as soon as a node's first batch shows that its values for all
        batches would take the held bytes past ``max_bytes`` (before the other batches run)."""
        stop = self._index(name)
        if self.pos <= stop:
            self._free(self.pending)
        while self.pos <= stop:
            n = self.nodes[self.pos]
            if n.op not in ("placeholder", "output"):
                for k, it in enumerate(self.interps):
                    value = it.run_node(n)
                    it.env[n] = value
                    self.live += _nbytes(value)
                    if k == 0 and self.max_bytes is not None:
                        projected = self.live + _nbytes(value) * (len(self.interps) - 1)
                        if projected > self.max_bytes:
                            raise StagedTooLarge(f"about {projected} bytes would be held at node {n.name} over "
                                                 f"{len(self.interps)} batches, above {self.max_bytes}")
                last = [a for a in n.all_input_nodes if self.last_use.get(a) == self.pos and a.op != "placeholder"]
                if self.pos == stop:
                    self.pending = last  # kept for a rerun of the stop node
                else:
                    self._free(last)
            self.pos += 1
        return self.value(name)

    def _free(self, nodes) -> None:
        for a in nodes:
            for it in self.interps:
                self.live -= _nbytes(it.env.pop(a, None))
        self.pending = []

    def _index(self, name: str) -> int:
        if name not in self.index:
            raise KeyError(f"no node named {name!r} in the traced graph")
        return self.index[name]

    def value(self, name: str) -> list:
        node = self.nodes[self._index(name)]
        if any(node not in it.env for it in self.interps):
            raise RuntimeError(f"node {name} is not held: it was freed after its last use, or has not run")
        return [it.env[node] for it in self.interps]

    def close(self) -> None:
        """Drop every held value (the run cannot go on)."""
        for it in self.interps:
            it.env.clear()
        self.pending, self.live = [], 0

    def set_state(self, key: str, value: torch.Tensor) -> None:
        """Nodes run from now on (and `rerun`) read ``value`` for state tensor ``key``."""
        for h in self.holders.get(key, []):
            for it in self.interps:
                it.env[h] = value

    @torch.no_grad()
    def rerun(self, name: str) -> list:
        """Run node ``name`` again (already run, value still held) with the current state."""
        self.value(name)  # raises unless held
        node = self.nodes[self.index[name]]
        if node.op == "placeholder":
            raise RuntimeError(f"node {name} is an input of the graph: there is nothing to run again")
        out = []
        for it in self.interps:
            old = it.env[node]
            it.env[node] = it.run_node(node)
            self.live += _nbytes(it.env[node]) - _nbytes(old)
            out.append(it.env[node])
        return out
