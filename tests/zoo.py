"""A registry of tiny models covering every rule family (the test zoo).

Each entry is ``name -> (factory, example input factory)``. Models are small so that export and
float64 checks take well under a second each.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, ...]]]] = {}


def register(name: str, inputs: Callable[[], tuple[torch.Tensor, ...]]):
    def deco(factory):
        ZOO[name] = (factory, inputs)
        return factory
    return deco


def img(c=3, s=8, b=2):
    return lambda: (torch.randn(b, c, s, s),)


def vec(n=6, b=4):
    return lambda: (torch.randn(b, n),)


# ---------------------------------------------------------------- MLPs
@register("mlp", vec(6))
def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@register("mlp_norms_prelu", vec(6))
def mlp_norms_prelu():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.PReLU(16), nn.Linear(16, 12),
                         nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 8), nn.PReLU(), nn.Dropout(0.1),
                         nn.Linear(8, 3))


# ---------------------------------------------------------------- CNNs
@register("vgg", img(3, 8))
def vgg():
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(3, 8), *block(8, 8), nn.MaxPool2d(2), *block(8, 12), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(12 * 2 * 2, 10), nn.ReLU(), nn.Linear(10, 5))


class BasicBlock(nn.Module):
    def __init__(self, i, o, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.shortcut = nn.Sequential()
        if stride != 1 or i != o:
            self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20-style: 3 stages of basic blocks (1 block per stage here), width w."""

    def __init__(self, w=4, blocks=1, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        layers, i = [], w
        for stage, o in enumerate((w, 2 * w, 4 * w)):
            for b in range(blocks):
                layers.append(BasicBlock(i, o, 2 if (stage > 0 and b == 0) else 1))
                i = o
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(4 * w, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


@register("resnet20", img(3, 8))
def resnet20():
    return ResNet20(w=4, blocks=2)


class Bottleneck(nn.Module):
    def __init__(self, i, mid, o, stride=1, groups=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(i, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, o, 1, bias=False), nn.BatchNorm2d(o)
        self.down = None
        if stride != 1 or i != o:
            self.down = nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


@register("bottleneck", img(3, 8))
def bottleneck():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Bottleneck(16, 4, 16), Bottleneck(16, 8, 24, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4))


@register("resnext", img(3, 8))
def resnext():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Bottleneck(16, 8, 16, groups=4),
                         Bottleneck(16, 12, 20, 2, groups=3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(20, 4))


class PreActBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(y)))


@register("preact_resnet", img(3, 8))
def preact_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PreActBlock(8), PreActBlock(8), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class DenseNetLike(nn.Module):
    def __init__(self, c0=6, growth=4, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.layers = nn.ModuleList()
        c = c0
        for _ in range(layers):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1))


@register("densenet", img(3, 8))
def densenet():
    return DenseNetLike()


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(8, 3, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 2, 1))
        self.head = nn.Conv2d(11, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        x = F.avg_pool2d(F.relu(self.head(x)), 2)
        return self.fc(torch.flatten(x, 1))


@register("inception", img(3, 8))
def inception():
    return InceptionLike()


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=3):
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                   nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                   nn.ReLU6(), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


@register("mobilenetv2", img(3, 8))
def mobilenetv2():
    return nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.Hardswish(), InvertedResidual(6),
                         InvertedResidual(6), nn.Conv2d(6, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(10, 4))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-1 * torch.ones(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


@register("convnext", img(3, 8))
def convnext():
    return nn.Sequential(nn.Conv2d(3, 8, 2, 2), ConvNeXtBlock(8), ConvNeXtBlock(8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3))


class SE(nn.Module):
    def __init__(self, c, r=2):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


@register("squeeze_excite", img(3, 8))
def squeeze_excite():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SE(8), nn.Conv2d(8, 6, 3, padding=1),
                         SE(6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


@register("groupnorm", img(3, 8))
def groupnorm():
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.SiLU(), nn.Conv2d(12, 8, 3),
                         nn.GroupNorm(1, 8), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GroupNorm(4, 8), nn.SiLU(),
                         nn.InstanceNorm2d(8, affine=True), nn.SiLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2))


@register("conv1d", lambda: (torch.randn(2, 3, 16),))
def conv1d():
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.Tanh(), nn.Conv1d(8, 8, 3, groups=2),
                         nn.MaxPool1d(2), nn.Conv1d(8, 6, 1), nn.Sigmoid(), nn.Flatten(), nn.Linear(6 * 7, 3))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(10, 5, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(11, 7, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(7, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        u = self.up(e2)
        d = self.dec(torch.cat([u, e1], 1))
        return self.out(F.interpolate(d, scale_factor=1.0, mode="nearest") + 0 * d)


@register("unet", img(3, 8))
def unet():
    return UNet()


class TiedLM(nn.Module):
    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.norm(F.gelu(self.fc(self.emb(idx))))
        return self.head(h)


@register("tied_embedding", lambda: (torch.randint(0, 11, (2, 5)),))
def tied_embedding():
    return TiedLM()


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 6 * 4 * 4) * 0.1)
        self.b2 = nn.Parameter(torch.randn(5) * 0.1)
        self.w3 = nn.Parameter(torch.randn(2, 5) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        y = F.max_pool2d(y, 2).reshape(y.shape[0], -1)
        return F.linear(torch.tanh(F.linear(y, self.w2, self.b2)), self.w3)


@register("functional", img(3, 8))
def functional():
    return Functional()


class GLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(8, 10), nn.Linear(10, 3)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        h = a * torch.sigmoid(b)
        h = F.glu(self.fc2(h).repeat(1, 2), dim=-1)
        return self.fc3(h)


@register("glu", vec(6))
def glu():
    return GLUNet()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.out(h)


@register("module_twice", vec(6))
def module_twice():
    return Twice()


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("shift", torch.linspace(-1, 1, 5), persistent=False)

    def forward(self, x):
        h = torch.relu(self.fc1(x) * self.scale)
        return self.fc3(torch.relu(self.fc2(h) + self.shift))


@register("buffer", vec(6))
def buffer():
    return WithBuffer()


# ---------------------------------------------------------------- attention
class Attention(nn.Module):
    """timm-style attention: one fused qkv Linear, heads by reshape / permute."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    def __init__(self, dim=8, heads=2, depth=2, patch=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(n1=nn.LayerNorm(dim), attn=Attention(dim, heads),
                                                  n2=nn.LayerNorm(dim), fc1=nn.Linear(dim, 2 * dim),
                                                  fc2=nn.Linear(2 * dim, dim))))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = x + blk["attn"](blk["n1"](x))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["n2"](x))))
        return self.head(self.norm(x)[:, 0])


@register("vit", img(3, 8))
def vit():
    return TinyViT()


class MHANet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(h + a)


@register("mha", lambda: (torch.randn(2, 4, 5),))
def mha():
    return MHANet()


class HandAttention(nn.Module):
    """softmax(Q K^T) V written by hand with separate q, k, v projections."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 2)

    def forward(self, x):
        h = self.inp(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-2, -1) / 8 ** 0.5, dim=-1)
        return self.out(h + self.o(att @ self.v(h)))


@register("hand_attention", lambda: (torch.randn(2, 5, 4),))
def hand_attention():
    return HandAttention()


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half),
                                    nn.Conv2d(half, half, 1), nn.ReLU())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


@register("shufflenet", img(3, 8))
def shufflenet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ShuffleUnit(8), ShuffleUnit(8), nn.Conv2d(8, 6, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


class WindowAttention(nn.Module):
    """Swin-style: qkv bias built by cat (k bias zero), relative position bias by index, roll."""

    def __init__(self, dim=8, heads=2, n=4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim) * 0.1), nn.Parameter(torch.randn(dim) * 0.1)
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads) * 0.1)
        idx = torch.arange(n)
        self.register_buffer("rel_index", (idx[:, None] - idx[None, :] + n - 1).flatten())
        self.proj = nn.Linear(dim, dim)
        self.inp, self.out = nn.Linear(3, dim), nn.Linear(dim, 2)

    def forward(self, x):
        h = self.inp(torch.roll(x, 1, dims=1))
        b, n, c = h.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(h, self.qkv.weight, bias).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        rel = self.table[self.rel_index].view(n, n, self.heads).permute(2, 0, 1)
        att = torch.softmax(q @ k.transpose(-2, -1) + rel.unsqueeze(0), dim=-1)
        y = self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return self.out(F.pad(h + y, (0, 0, 1, 1)))


@register("window_attention", lambda: (torch.randn(2, 4, 3),))
def window_attention():
    return WindowAttention()


class EinsumAttention(nn.Module):
    """Attention and a projection written with einsum (incl. an ellipsis), then pixel shuffle."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(6, 8), nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(8, 5) * 0.3)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        v = torch.einsum("bnd,de->bne", q, self.w)
        att = torch.einsum("bqd,bkd->bqk", q, k).softmax(-1)
        z = torch.einsum("bqk,bke->bqe", att, v)
        return self.b(torch.einsum("...e,...e->...e", z, torch.tanh(z)))


@register("einsum", lambda: (torch.randn(2, 4, 6),))
def einsum():
    return EinsumAttention()
