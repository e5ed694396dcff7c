"""Every example runs to its final assert (each takes under a minute on one CPU thread)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))

# what an example needs beyond the test extras, with the reason it is skipped without it
NEEDS = {
    "zoo_spec_svg.py": (lambda: shutil.which("dot") is not None or importlib.util.find_spec("matplotlib") is not None,
                        "draws an SVG: needs graphviz's dot or matplotlib (autoperm[viz])"),
}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path):
    available, why = NEEDS.get(path.name, (lambda: True, ""))
    if not available():
        pytest.skip(why)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), f"{path.name} printed nothing"


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"trace_and_permute.py", "merge_digits_mlp.py", "resnet_repair.py", "pfm.py", "partial.py",
            "zoo_spec_svg.py", "distill_and_merge.py"} <= names, names
