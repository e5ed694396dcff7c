"""Models for the digits benchmarks (inputs 1x8x8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(width):
    return lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, 10))


def vgg():
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))


class Basic(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.conv2, self.bn2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.short = nn.Sequential()
        if stride != 1 or i != o:
            self.short = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet20(nn.Module):
    def __init__(self, k=1):
        super().__init__()
        w = 16 * k
        self.conv, self.bn = nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w)
        layers, c = [], w
        for s, o in enumerate((w, 2 * w, 4 * w)):
            for b in range(3):
                layers.append(Basic(c, o, 2 if (s > 0 and b == 0) else 1))
                c = o
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvRes(nn.Module):
    def __init__(self, c, e=4):
        super().__init__()
        h = c * e
        self.f = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                               nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                               nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.f(x)


def mobilenet():
    return nn.Sequential(nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
                         InvRes(24), InvRes(24), nn.Conv2d(24, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48),
                         nn.ReLU6(), InvRes(48), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


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
    """A small ViT on 2x2 patches of the 8x8 digits: 16 tokens + a class token, 2 blocks."""

    def __init__(self, dim=64, heads=4, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


# name -> (factory, trained on class-biased halves?)
MODELS = {
    "mlp32": (mlp(32), False), "mlp128": (mlp(128), False), "mlp512": (mlp(512), False),
    "vgg": (vgg, False), "resnet20x1": (lambda: ResNet20(1), False), "resnet20x4": (lambda: ResNet20(4), False),
    "mobilenetv2": (mobilenet, False), "mlp128_split": (mlp(128), True), "vit": (DigitsViT, False),
}
