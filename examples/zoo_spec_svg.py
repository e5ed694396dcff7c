"""Compile the permutation spec of torchvision's ResNet-18 (random weights, 64x64 inputs) and draw
it as an SVG: one node per layer (a conv and its BatchNorm fused), one colour per group, frozen
dims with their reasons. Graphviz's `dot` draws it when installed, else matplotlib
(pip install "autoperm[viz]"). About 20 s on one CPU thread.

    python examples/zoo_spec_svg.py [OUT.svg]     # default: <tmp>/autoperm_examples/resnet18_spec.svg
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

import autoperm
from autoperm.viz import render_spec
from autoperm.zoo import load

torch.set_num_threads(1)
t0 = time.perf_counter()

default = Path(tempfile.gettempdir()) / "autoperm_examples" / "resnet18_spec.svg"
out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
model, inputs = load("torchvision:resnet18", image_size=64)  # no weights downloaded
print(f"example inputs {[tuple(t.shape) for t in inputs]}")

spec = autoperm.trace(model, inputs)  # compiled and checked in float64
print(f"{len(spec.groups)} groups, {len(spec.frozen)} frozen dims; largest groups:")
for g in sorted(spec.groups, key=lambda g: -len(g.axes))[:4]:
    print(f"  {g.name}: {g.size} channels, {len(g.axes)} tensor axes")

render_spec(spec, out, model=model, example_inputs=inputs)
text = out.read_text()
print(f"wrote {out} ({out.stat().st_size} bytes) in {time.perf_counter() - t0:.0f} s")

assert out.exists() and out.stat().st_size > 1000
assert "<svg" in text
assert len(spec.groups) == 12  # one residual stream per stage (4) + the inner channels of 8 blocks
