"""Models for the merge benchmarks. Every factory takes the input shape ``(channels, *spatial)``:
``(1, 8, 8)`` for scikit-learn's digits (the default) or ``(1, 40)`` for mnist1d; the conv
models pick ``Conv1d`` / ``Conv2d`` (and the matching BatchNorm / pooling) from its length."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIGITS = (1, 8, 8)


def _layer(kind: str, shape_or_dims) -> type:
    """``nn.Conv1d`` / ``nn.Conv2d`` etc. for ``kind`` in Conv, BatchNorm, MaxPool, AdaptiveAvgPool."""
    dims = shape_or_dims if isinstance(shape_or_dims, int) else len(shape_or_dims) - 1
    return getattr(nn, f"{kind}{dims}d")


def mlp(width):
    return lambda shape=DIGITS: nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), width), nn.ReLU(),
                                              nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def vgg(shape=DIGITS):
    conv, pool = _layer("Conv", shape), _layer("MaxPool", shape)

    def block(i, o):
        return [conv(i, o, 3, padding=1), nn.ReLU()]
    flat = 64 * math.prod(s // 4 for s in shape[1:])
    return nn.Sequential(*block(shape[0], 32), *block(32, 32), pool(2), *block(32, 64), *block(64, 64),
                         pool(2), nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 10))


class Basic(nn.Module):
    def __init__(self, i, o, stride, dims=2):
        super().__init__()
        conv, bn = _layer("Conv", dims), _layer("BatchNorm", dims)
        self.conv1, self.bn1 = conv(i, o, 3, stride, 1, bias=False), bn(o)
        self.conv2, self.bn2 = conv(o, o, 3, 1, 1, bias=False), bn(o)
        self.short = nn.Sequential()
        if stride != 1 or i != o:
            self.short = nn.Sequential(conv(i, o, 1, stride, bias=False), bn(o))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet20(nn.Module):
    def __init__(self, k=1, shape=DIGITS):
        super().__init__()
        w, dims = 16 * k, len(shape) - 1
        self.conv, self.bn = _layer("Conv", dims)(shape[0], w, 3, 1, 1, bias=False), _layer("BatchNorm", dims)(w)
        layers, c = [], w
        for s, o in enumerate((w, 2 * w, 4 * w)):
            for b in range(3):
                layers.append(Basic(c, o, 2 if (s > 0 and b == 0) else 1, dims))
                c = o
        self.layers = nn.Sequential(*layers)
        self.pool = getattr(F, f"adaptive_avg_pool{dims}d")
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x, 1).flatten(1))


class InvRes(nn.Module):
    def __init__(self, c, e=4, dims=2):
        super().__init__()
        h, conv, bn = c * e, _layer("Conv", dims), _layer("BatchNorm", dims)
        self.f = nn.Sequential(conv(c, h, 1, bias=False), bn(h), nn.ReLU6(),
                               conv(h, h, 3, padding=1, groups=h, bias=False), bn(h), nn.ReLU6(),
                               conv(h, c, 1, bias=False), bn(c))

    def forward(self, x):
        return x + self.f(x)


def mobilenet(shape=DIGITS, width=1):
    """MobileNetV2-style: stem, two inverted residuals, a strided conv, one more; ``width``
    multiplies every channel count (24 / 48 at 1)."""
    dims, c = len(shape) - 1, 24 * width
    conv, bn = _layer("Conv", dims), _layer("BatchNorm", dims)
    return nn.Sequential(conv(shape[0], c, 3, padding=1, bias=False), bn(c), nn.ReLU6(),
                         InvRes(c, dims=dims), InvRes(c, dims=dims), conv(c, 2 * c, 3, 2, 1, bias=False),
                         bn(2 * c), nn.ReLU6(), InvRes(2 * c, dims=dims), _layer("AdaptiveAvgPool", dims)(1),
                         nn.Flatten(), nn.Linear(2 * c, 10))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class DigitsViT(nn.Module):
    """A small ViT: 2x2 patches of the 8x8 digits (16 tokens; patches of 4 on a 1-D signal) + a
    class token, 2 blocks."""

    def __init__(self, dim=64, heads=4, depth=2, shape=DIGITS):
        super().__init__()
        dims = len(shape) - 1
        p = 2 if dims == 2 else 4
        tokens = math.prod(s // p for s in shape[1:])
        self.patch = _layer("Conv", dims)(shape[0], dim, p, stride=p)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


# name -> (factory(shape=DIGITS), trained on class-biased halves?)
MODELS = {
    "mlp32": (mlp(32), False), "mlp128": (mlp(128), False), "mlp512": (mlp(512), False),
    "vgg": (vgg, False), "resnet20x1": (lambda shape=DIGITS: ResNet20(1, shape), False),
    "resnet20x4": (lambda shape=DIGITS: ResNet20(4, shape), False),
    "mobilenetv2": (mobilenet, False), "mlp128_split": (mlp(128), True),
    "vit": (lambda shape=DIGITS: DigitsViT(shape=shape), False),
    "mobilenetv2x4": (lambda shape=DIGITS: mobilenet(shape, 4), False),
}
