"""Merge two small ResNets trained on scikit-learn's digits from different seeds, with weight and
activation matching, each without normalization, with RESET (recompute BatchNorm statistics) and
with REPAIR (the Vanishing Feature paper, section 4.2; Jordan et al.). `autoperm.diagnose` shows
why: without normalization the merged model's variance collapses layer after layer.
About 30 s on one CPU thread."""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import autoperm

torch.set_num_threads(1)
t0 = time.perf_counter()

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def fit(seed, epochs=6):
    torch.manual_seed(seed)
    model = ResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * 22)
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[train[idx]]), y[train[idx]]).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model):
    return (model(x[test]).argmax(1) == y[test]).float().mean().item()


a, b = fit(1), fit(2)
calib = list(x[train[:512]].split(128))  # unlabeled training images for statistics
print(f"endpoints: {accuracy(a):.3f} / {accuracy(b):.3f}   (trained in {time.perf_counter() - t0:.0f} s)")

results = {}
for method in ("weight", "activation"):
    al = autoperm.match(a, b, method=method, data=calib)  # align once, merge three ways
    # every conv here feeds a BatchNorm, so REPAIR recomputes those statistics exactly as RESET does
    for normalize in (None, "reset", "repair"):
        merged = autoperm.merge(a, b, alignment=al, normalize=normalize, data=calib)
        results[method, normalize] = accuracy(merged)
        print(f"{method:>10} matching, normalize={str(normalize):<6}: {results[method, normalize]:.3f}")
results["identity", None] = accuracy(autoperm.merge(a, b, method="identity"))
print(f"naive average (no alignment, no normalization): {results['identity', None]:.3f}")

plain = autoperm.merge(a, b, method="weight")
repaired = autoperm.merge(a, b, method="weight", normalize="repair", data=calib)
print("\nweight matching, no normalization (merged / endpoints):")
print(autoperm.diagnose(plain, [a, b], calib).table())
print("weight matching + REPAIR (the head, the output layer, is left alone):")
print(autoperm.diagnose(repaired, [a, b], calib).table())
print(f"\ntotal {time.perf_counter() - t0:.0f} s")

for method in ("weight", "activation"):
    assert results[method, "reset"] > results[method, None], results
    assert results[method, "repair"] > results[method, None], results
assert results["weight", "repair"] > results["identity", None] + 0.2, results
