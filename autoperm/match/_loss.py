"""The midpoint model's loss on data, differentiable in model B's (soft-)permuted weights.

Shared by the Sinkhorn matcher's loss objective (`autoperm.match.sinkhorn`) and the
straight-through estimator (`autoperm.match.ste`), with the Adam loop both run (`descend`). The
midpoint model is evaluated with
``torch.func.functional_call`` on a private copy of model A in eval mode (BatchNorm uses the
interpolated running statistics, dropout is off), so the caller's models are never touched and
no buffer is updated. Batches are used in order, cyclically: step ``s`` uses batch ``s mod n``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .._copy import copy_module
from .._data import batch_inputs, batch_target
from .._progress import progress
from ..spec import PermutationSpec

__all__ = ["MidpointLoss", "check_loss_fn", "check_targets", "check_budget", "touched_float_keys", "descend"]


def check_budget(steps: Any, lr: Any) -> None:
    """Raise naming ``steps`` or ``lr`` when it is not a non-negative integer / positive number."""
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r}: pass a non-negative integer step budget")
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ValueError(f"lr={lr!r}: pass a positive, finite learning rate")


def touched_float_keys(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The float tensors of ``state`` that some group of ``spec`` acts on, sorted."""
    return sorted({ax.tensor for g in spec.groups for ax in g.axes if state[ax.tensor].is_floating_point()})


def descend(params: list[torch.Tensor], value_at: Callable[[int], torch.Tensor], *, steps: int, lr: float,
            log: logging.Logger, desc: str, what: str) -> list[float]:
    """``steps`` Adam steps on ``params`` minimizing ``value_at(step)``; the value per step, each
    logged to ``log`` as ``"<desc> step i/steps: <what> value"``."""
    opt = torch.optim.Adam(params, lr=float(lr))
    history: list[float] = []
    for step in progress(range(steps), desc=desc, total=steps):
        value = value_at(step)
        opt.zero_grad()
        value.backward()
        opt.step()
        history.append(float(value.detach()))
        log.info("%s step %d/%d: %s %.6g", desc, step + 1, steps, what, history[-1])
    return history


def check_loss_fn(method: str, loss_fn: Any) -> None:
    """Raise naming ``loss_fn`` when it is not a callable ``loss_fn(outputs, target)``."""
    if not callable(loss_fn):
        raise ValueError(f"method={method!r} got loss_fn={loss_fn!r}: pass a callable "
                         "loss_fn(outputs, target) -> scalar tensor, e.g. torch.nn.functional.cross_entropy")


def check_targets(method: str, batch: Any, n_inputs: int = 1) -> Any:
    """The target of ``batch``; raise naming ``data`` when it has none."""
    target = batch_target(batch, n_inputs)
    if target is None:
        raise ValueError(f"method={method!r} with loss_fn= needs targets: each batch of data= must be a "
                         f"tuple (inputs..., target) with {n_inputs} input(s) first; got a batch without a target")
    return target


class MidpointLoss:
    """``loss_fn(f((1 - alpha) * A + alpha * B'), target)`` on batch ``step mod len(data)``.

    ``B'`` is the (soft-)aligned state of model B handed to `__call__`; tensors it lacks are
    taken from ``state_b``. Integer tensors come from A. Example::

        obj = MidpointLoss(model_a, sa, sb, data, torch.nn.functional.cross_entropy, method="ste")
        obj(permute_state_dict(sb, spec, perms), step=0).backward()
    """

    def __init__(self, model_a: nn.Module, state_a: Mapping[str, torch.Tensor],
                 state_b: Mapping[str, torch.Tensor], data: Iterable, loss_fn: Callable, *,
                 n_inputs: int = 1, alpha: float = 0.5, method: str = "sinkhorn") -> None:
        check_loss_fn(method, loss_fn)
        self.batches = []
        for batch in data:
            target = check_targets(method, batch, n_inputs)
            self.batches.append((batch_inputs(batch, n_inputs), target))
        if not self.batches:
            raise ValueError(f"method={method!r} got no batches in data=")
        self.model = copy_module(model_a).eval()
        # buffers (BatchNorm running statistics) are interpolated but carry no gradient:
        # batch_norm refuses running statistics that require grad
        self.buffers = {name for name, _ in self.model.named_buffers()}
        self.state_a = {k: v.detach() for k, v in state_a.items()}
        self.state_b = {k: v.detach() for k, v in state_b.items()}
        self.loss_fn = loss_fn
        self.alpha = float(alpha)

    def midpoint(self, aligned_b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, a in self.state_a.items():
            b = aligned_b.get(k, self.state_b[k])
            out[k] = a + self.alpha * (b - a) if a.is_floating_point() else a
            if k in self.buffers:
                out[k] = out[k].detach()
        return out

    def __call__(self, aligned_b: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        inputs, target = self.batches[step % len(self.batches)]
        outputs = functional_call(self.model, self.midpoint(aligned_b), inputs, strict=False)
        try:
            loss = self.loss_fn(outputs, target)
        except (TypeError, AttributeError) as e:
            if isinstance(outputs, torch.Tensor):
                raise
            raise TypeError(f"loss_fn(outputs, target) failed on the model's outputs, a {type(outputs).__name__} "
                            f"rather than a tensor ({type(e).__name__}: {e}); pass a loss_fn that reads them, e.g. "
                            "loss_fn=lambda out, y: F.cross_entropy(out['logits'], y)") from e
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn(outputs, target) must return a scalar tensor; got "
                             f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else list(loss.shape)}")
        return loss.reshape(())

    @torch.no_grad()
    def total(self, aligned_b: Mapping[str, torch.Tensor]) -> float:
        """The mean loss over every batch (for reports and tests)."""
        return sum(self(aligned_b, i).item() for i in range(len(self.batches))) / len(self.batches)
