"""The README's main job: python -m autoperm demo."""

import json
import subprocess
import sys


def test_demo_writes_spec_and_graph(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "autoperm", "demo", "--out", str(out), "--epochs", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage2.0.shortcut.0.weight" in result.stdout and "weight matching + REPAIR" in result.stdout
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0] == "alpha,naive,weight + REPAIR" and len(rows) == 10
    spec = json.loads((out / "spec.json").read_text())
    assert spec["format"] == "autoperm.PermutationSpec" and len(spec["groups"]) == 6
    assert (out / "spec.dot").read_text().startswith("graph spec {")


def test_help_and_bad_command():
    ok = subprocess.run([sys.executable, "-m", "autoperm", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "demo" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "autoperm", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
