"""Deep copies of modules that also work after the module cached autograd-tracked tensors.

Some models store tensors computed in forward on themselves (timm's EfficientFormer caches its
attention bias in eval mode); ``copy.deepcopy`` refuses such non-leaf tensors. `copy_module`
copies them detached, so copying never fails because the caller ran the model first.
`copy_with_state` loads new weights into such a copy and then calls ``train(mode)``, which is
where those models clear their caches (timm's LeViT and EfficientFormer do), so that no copy runs
on a cache computed from the old weights; submodules whose mode differs from the model's (a
frozen BatchNorm) then get their own mode back (`match_modes`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["copy_module", "copy_with_state", "match_modes"]


def _non_leaf(value, memo: dict, depth: int = 0) -> None:
    if depth > 3:
        return
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None and id(value) not in memo:
            memo[id(value)] = value.detach().clone()
    elif isinstance(value, dict):
        for v in value.values():
            _non_leaf(v, memo, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _non_leaf(v, memo, depth + 1)


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with tensors cached by forward (non-leaf) copied detached."""
    memo: dict = {}
    for m in model.modules():
        for name, value in vars(m).items():
            if name != "_modules":  # submodules are visited by model.modules()
                _non_leaf(value, memo)
    return copy.deepcopy(model, memo)


def copy_with_state(model: nn.Module, state) -> nn.Module:
    """A copy of ``model`` carrying ``state`` (a full state dict), in the model's train / eval
    mode, with forward caches of the old weights cleared where the model clears them in ``train``."""
    out = copy_module(model)
    out.load_state_dict(state)
    return match_modes(out.train(model.training), model)


def match_modes(out: nn.Module, model: nn.Module) -> nn.Module:
    """``out`` (a copy of ``model``) with each submodule in the train / eval mode of ``model``'s
    submodule of the same name (a BatchNorm frozen in eval inside a model in training mode stays
    frozen); ``train`` is called where a mode differs, parents before children."""
    own = dict(model.named_modules())
    for name, m in out.named_modules():
        if name in own and m.training != own[name].training:
            m.train(own[name].training)
    return out
