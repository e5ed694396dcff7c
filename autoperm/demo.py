"""The built-in demo: compile the spec of a small residual CNN, print its table, write its graph.

``python -m autoperm demo`` runs `run_demo`. The model is a ResNet-style net sized for 8x8
digit images (scikit-learn's digits), so the demo needs no download.
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


def run_demo(out_dir: str | Path = "autoperm_demo") -> str:
    """Trace `DemoNet`, write ``spec.json`` and ``spec.dot`` under ``out_dir``; return the report."""
    from .api import trace
    from .permute import permute, random_permutation

    torch.manual_seed(0)
    model = DemoNet().eval()
    x = torch.randn(4, 1, 8, 8)
    spec = trace(model, x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.json")
    (out / "spec.dot").write_text(spec.to_dot().to_string())
    permuted = permute(model, spec, random_permutation(spec, seed=1))
    with torch.no_grad():
        diff = (permuted(x) - model(x)).abs().max().item()
    lines = [spec.table(), "",
             f"compiled in {spec.meta['capture_s'] + spec.meta['analysis_s']:.2f}s "
             f"(export {spec.meta['capture_s']:.2f}s, analysis {spec.meta['analysis_s']:.3f}s); "
             f"float64 check error {spec.meta['verify_error']:.1e}",
             f"a randomly permuted copy differs from the model by {diff:.1e} (float32)",
             f"wrote {out / 'spec.json'} and {out / 'spec.dot'} "
             f"(render with: dot -Tsvg {out / 'spec.dot'} -o spec.svg)"]
    return "\n".join(lines)
