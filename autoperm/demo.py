"""The built-in demo: train two small residual CNNs on scikit-learn's digits (shipped with
scikit-learn, no download), compile their permutation spec, merge them and compare.

``python -m autoperm demo`` runs `run_demo`: about a minute on two CPU cores. Narrow residual
nets merge worse than wide ones (Git Re-Basin needs width); at width 48 aligned merges come
within a few points of the endpoints while the naive average collapses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DemoNet", "run_demo"]

log = logging.getLogger(__name__)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DemoNet(nn.Module):
    """A small ResNet for 1x8x8 images: a stem, two stages of two blocks, a linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(_Block(width, width, 1), _Block(width, width, 1))
        self.stage2 = nn.Sequential(_Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the demo trains on scikit-learn's digits: pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def _train(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    model = DemoNet(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        log.info("model %d: epoch %d/%d", seed, epoch + 1, epochs)
    return model.eval()


def run_demo(out_dir: str | Path = "autoperm_demo", epochs: int = 8, width: int = 48) -> str:
    """Train two `DemoNet`s on digits from different seeds, compile the spec, merge them (naive,
    weight matching, + REPAIR, activation matching + REPAIR / + regression) against the ensemble,
    and write ``spec.json``, ``spec.dot``, ``curve.csv`` (and ``curve.png`` when matplotlib is
    installed) under ``out_dir``; return the report."""
    import time

    from .api import trace
    from .curve import interpolate
    from .merging import match, merge

    torch.set_num_threads(1)  # small models: extra threads cost more than they save
    t0 = time.perf_counter()
    (xtr, ytr), (xte, yte) = _digits()
    a, b = _train(1, xtr, ytr, epochs, width), _train(2, xtr, ytr, epochs, width)
    data = list(xtr.split(256))

    @torch.no_grad()
    def acc(model: nn.Module) -> float:
        return (model(xte).argmax(1) == yte).float().mean().item()

    spec = trace(a, xte[:4])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.json")
    (out / "spec.dot").write_text(spec.to_dot().to_string())
    with torch.no_grad():
        ensemble = ((a(xte) + b(xte)).argmax(1) == yte).float().mean().item()
    rows = [("model A", acc(a)), ("model B", acc(b)), ("ensemble (2x compute)", ensemble)]
    weight = match(a, b, spec, method="weight")
    activation = match(a, b, spec, method="activation", data=data)
    for label, al, norm in [("naive average", match(a, b, spec, method="identity"), None),
                            ("weight matching", weight, None), ("weight matching + RESET", weight, "reset"),
                            ("weight matching + REPAIR", weight, "repair"),
                            ("activation matching + REPAIR", activation, "repair"),
                            ("activation matching + regression", activation, "regression")]:
        rows.append((label, acc(merge(a, b, alignment=al, normalize=norm, data=data))))
    alphas = [i / 8 for i in range(9)]
    curves = {name: interpolate(a, b, alphas, acc, alignment=al, normalize=norm, data=data)
              for name, al, norm in [("naive + RESET", match(a, b, spec, method="identity"), "reset"),
                                     ("weight + REPAIR", weight, "repair")]}
    _write_curves(out, alphas, curves)
    width = max(len(r[0]) for r in rows)
    lines = [spec.table(), "", "test accuracy on digits (midpoint alpha = 0.5 for merges):"]
    lines += [f"  {name.ljust(width)}  {100 * v:5.1f}%" for name, v in rows]
    lines += ["", f"accuracy barrier: naive + RESET {100 * curves['naive + RESET'].accuracy_barrier('value'):.1f} points, "
              f"weight + REPAIR {100 * curves['weight + REPAIR'].accuracy_barrier('value'):.1f} points",
              f"wrote {out / 'spec.json'}, {out / 'spec.dot'} (dot -Tsvg {out / 'spec.dot'} -o {out / 'spec.svg'}) "
              f"and the interpolation curve {out / 'curve.csv'}"
              + (f", {out / 'curve.png'}" if (out / "curve.png").exists() else " (pip install matplotlib for a plot)"),
              f"done in {time.perf_counter() - t0:.0f}s"]
    return "\n".join(lines)


def _write_curves(out: Path, alphas, curves) -> None:
    names = list(curves)
    rows = ["alpha," + ",".join(names)]
    rows += [f"{a}," + ",".join(f"{curves[n].series('value')[i]:.4f}" for n in names) for i, a in enumerate(alphas)]
    (out / "curve.csv").write_text("\n".join(rows) + "\n")
    try:
        from .viz import plot_curve

        plot_curve(curves, out / "curve.png")
    except ImportError:
        log.info("matplotlib is not installed: no curve.png (pip install matplotlib)")
