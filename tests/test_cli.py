"""The command line (`autoperm.__main__.main`, in-process where possible) and the spec pictures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoperm
from autoperm.__main__ import main
from autoperm.cli import EXIT_FILE, EXIT_MISMATCH, EXIT_MODEL, EXIT_OUTPUT, EXIT_USAGE
from autoperm.curve import Curve
from autoperm.viz import group_graph, layer_flow, layer_graph, plot_curve, render_spec

MODEL_FILE = '''
import torch
from torch import nn


class Res(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(x.flatten(1))


def make(width=8):
    return Res(width)


def narrow():
    return Res(4)


def make64():
    return Res().double()
'''
SHAPE = "2,1,4,4"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "net.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture(scope="module")
def checkpoints(model_file, tmp_path_factory):
    sys.path.insert(0, str(model_file.parent))
    try:
        import net
    finally:
        sys.path.remove(str(model_file.parent))
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, seed, factory in (("a", 1, net.make), ("b", 2, net.make), ("narrow", 3, net.narrow)):
        torch.manual_seed(seed)
        model = factory().eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
        paths[name] = folder / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    x = torch.randn(64, 1, 4, 4)
    paths["data"] = folder / "data.pt"
    torch.save((x, torch.randint(0, 10, (64,))), paths["data"])
    return paths, net


def test_demo_writes_spec_and_graph(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "autoperm", "demo", "--out", str(out), "--epochs", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stage2.0.shortcut.0.weight" in result.stdout and "weight matching + REPAIR" in result.stdout
    assert "activation matching + regression" in result.stdout
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0] == "alpha,naive + RESET,weight + REPAIR" and len(rows) == 10
    spec = json.loads((out / "spec.json").read_text())
    assert spec["format"] == "autoperm.PermutationSpec" and len(spec["groups"]) == 6
    assert (out / "spec.dot").read_text().startswith("graph spec {")


def test_help_and_bad_command(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["merge", "--help"]) == 0
    assert "--normalize" in capsys.readouterr().out
    assert main(["frobnicate"]) == EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_spec_summary_table_and_json(model_file, tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["spec", f"{model_file}:make", "--input-shape", SHAPE, "--table", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 permutation groups" in printed and "hidden channels grouped" in printed and "Traced in" in printed
    assert "head.weight" in printed and "model output" in printed  # the table
    spec = autoperm.PermutationSpec.load(out)
    assert sorted(g.size for g in spec.groups) == [8, 8]
    assert spec.shapes["head.weight"] == (10, 128)


@pytest.mark.parametrize("suffix", [".dot", ".svg", ".png"])
def test_spec_graph_formats(model_file, tmp_path, capsys, suffix):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"spec{suffix}"
    args = ["spec", f"{model_file}:make", "--input-shape", SHAPE, "--no-verify", "--out", str(out)]
    assert main(args + (["--compact"] if suffix == ".svg" else [])) == 0
    data = out.read_bytes()
    if suffix == ".dot":
        import pydot

        graph = pydot.graph_from_dot_data(data.decode())[0]
        names = {n.get_name().strip('"') for n in graph.get_nodes()}
        assert {"input", "stem", "conv1", "conv2", "head", "output"} <= names
        assert len(graph.get_edges()) >= 5
    elif suffix == ".svg":
        assert b"<svg" in data and b"group" in data
    else:
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_render_without_renderer_writes_dot_and_says_what_to_install(model_file, tmp_path, monkeypatch, capsys):
    import autoperm.viz_render as vr

    monkeypatch.setattr(vr.shutil, "which", lambda name: None)

    def no_matplotlib():
        raise ImportError("no matplotlib")

    monkeypatch.setattr(vr, "pyplot", no_matplotlib)
    out = tmp_path / "spec.png"
    code = main(["spec", f"{model_file}:make", "--input-shape", SHAPE, "--no-verify", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 8 and "graphviz" in err and "matplotlib" in err and "Traceback" not in err
    assert not out.exists() and (tmp_path / "spec.dot").read_text().startswith("digraph spec {")


def test_layer_flow_and_graphs(checkpoints):
    _, net = checkpoints
    model, x = net.make().eval(), torch.randn(2, 1, 4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flow = layer_flow(model, x)
    assert flow.layers[:2] == ["stem", "bn"] and flow.layers[-1] == "head"
    assert ("input", "stem") in flow.edges and ("head", "output") in flow.edges
    junction = next(n for n in flow.layers if n.startswith("op:+"))
    assert ("bn", junction) in flow.edges and ("conv2", junction) in flow.edges and (junction, "head") in flow.edges
    assert ("bn", "conv1") in flow.edges and ("conv1", "conv2") in flow.edges
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    spec = autoperm.trace(model, x)
    graph = layer_graph(spec, flow)
    assert "bn" not in graph and graph.nodes["stem"]["label"].startswith("stem + bn")  # conv + bn fused
    assert "frozen d0: model output" in graph.nodes["head"]["label"]
    stream = spec.axes_of("stem.weight")[0][0].name
    assert graph.edges["stem", junction]["label"] == stream and graph.edges["head", "output"]["label"] == ""
    groups = group_graph(spec)
    assert sorted(groups.nodes) == sorted(g.name for g in spec.groups)
    hidden = next(g.name for g, a in spec.axes_of("conv1.weight") if a.dim == 0)
    assert hidden != stream
    assert graph.edges["conv1", "conv2"]["label"] == hidden
    (edge,) = groups.edges(data=True)  # conv1.weight (stream -> hidden) and conv2.weight (back): one edge
    assert {edge[0], edge[1]} == {stream, hidden} and edge[2]["both"]
    assert sorted(edge[2]["tensors"]) == ["conv1.weight", "conv2.weight"]


def test_plot_curve(tmp_path):
    pytest.importorskip("matplotlib")
    curve = Curve([0.0, 0.5, 1.0], [{"value": 0.9}, {"value": 0.5}, {"value": 0.88}])
    out = plot_curve({"naive": curve}, tmp_path / "curve.svg")
    assert b"<svg" in out.read_bytes()


def test_merge_matches_library(checkpoints, model_file, tmp_path, capsys):
    paths, net = checkpoints
    out = tmp_path / "merged.pt"
    assert main(["merge", str(paths["a"]), str(paths["b"]), "--model", f"{model_file}:make",
                 "--input-shape", SHAPE, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    a, b = net.make(), net.make()
    a.load_state_dict(torch.load(paths["a"], weights_only=True))
    b.load_state_dict(torch.load(paths["b"], weights_only=True))
    expected = autoperm.merge(a.eval(), b.eval(), example_inputs=torch.randn(2, 1, 4, 4)).state_dict()
    got = torch.load(out, weights_only=True)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-6) for k in got)
    naive = 0.5 * (a.state_dict()["conv1.weight"] + b.state_dict()["conv1.weight"])
    assert not torch.allclose(got["conv1.weight"], naive)  # B was permuted before averaging


def test_merge_casts_float64_data_to_the_model_dtype(checkpoints, model_file, tmp_path, caplog):
    """A float64 --data file for a float32 model: the inputs are cast (with a warning) and the
    result equals the merge on the float32 inputs; before, the trace failed on the dtype."""
    paths, _ = checkpoints
    x, y = torch.load(paths["data"], weights_only=True)
    wide = tmp_path / "data64.pt"
    torch.save((x.double(), y), wide)
    outs = {}
    for tag, data in (("32", paths["data"]), ("64", wide)):
        outs[tag] = tmp_path / f"merged{tag}.pt"
        assert main(["merge", str(paths["a"]), str(paths["b"]), "--model", f"{model_file}:make", "--method",
                     "activation", "--normalize", "repair", "--data", str(data), "--out", str(outs[tag])]) == 0
    assert "casting the inputs to float32" in caplog.text
    got, expected = (torch.load(outs[t], weights_only=True) for t in ("64", "32"))
    assert all(got[k].dtype == expected[k].dtype and torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)


def test_input_shape_follows_a_float64_model(checkpoints, model_file, tmp_path):
    """--input-shape inputs take the model's dtype: a float64 factory merges (it failed in
    tracing on float32 inputs) and gives the float32 merge's weights in float64."""
    paths, _ = checkpoints
    outs = {}
    for factory in ("make", "make64"):
        outs[factory] = tmp_path / f"{factory}.pt"
        assert main(["merge", str(paths["a"]), str(paths["b"]), "--model", f"{model_file}:{factory}",
                     "--input-shape", SHAPE, "--out", str(outs[factory])]) == 0
    got, expected = (torch.load(outs[f], weights_only=True) for f in ("make64", "make"))
    assert got["stem.weight"].dtype == torch.float64
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-5) for k in expected)


def test_merge_with_data_and_reset(checkpoints, model_file, tmp_path, capsys):
    paths, net = checkpoints
    out = tmp_path / "merged.pt"
    assert main(["merge", str(paths["a"]), str(paths["b"]), "--model", f"{model_file}:make", "--method",
                 "activation", "--normalize", "reset", "--data", str(paths["data"]), "--batch-size", "16",
                 "--out", str(out)]) == 0
    assert "accuracy on --data: A" in capsys.readouterr().out
    a, b = net.make(), net.make()
    a.load_state_dict(torch.load(paths["a"], weights_only=True))
    b.load_state_dict(torch.load(paths["b"], weights_only=True))
    x, y = torch.load(paths["data"], weights_only=True)
    data = list(zip(x.split(16), y.split(16)))
    expected = autoperm.merge(a.eval(), b.eval(), method="activation", normalize="reset", data=data).state_dict()
    got = torch.load(out, weights_only=True)
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-5) for k in expected)
    interpolated = 0.5 * (a.state_dict()["bn.running_var"] + b.state_dict()["bn.running_var"])
    assert not torch.allclose(got["bn.running_var"], interpolated)  # statistics were recomputed


@pytest.mark.parametrize("case", ["missing", "bad_model", "no_factory", "mismatch", "overwrite", "no_data",
                                  "empty_data"])
def test_merge_errors(checkpoints, model_file, tmp_path, capsys, case):
    paths, _ = checkpoints
    a, b = str(paths["a"]), str(paths["b"])
    model = f"{model_file}:make"
    empty = tmp_path / "empty.pt"
    torch.save((torch.randn(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)), empty)
    args, code, words = {
        "missing": ([a, str(tmp_path / "nope.pt"), "--model", model], EXIT_FILE, "nope.pt' not found"),
        "bad_model": ([a, b, "--model", "resnet18"], EXIT_MODEL, "torchvision:NAME"),
        "no_factory": ([a, b, "--model", f"{model_file}:nothing"], EXIT_MODEL, "no factory 'nothing'"),
        "mismatch": ([a, str(paths["narrow"]), "--model", model], EXIT_MISMATCH, "tensor 'stem.weight' has shape [4"),
        "overwrite": ([a, b, "--model", model, "--out", a], EXIT_OUTPUT, "refusing to overwrite"),
        "no_data": ([a, b, "--model", model, "--normalize", "repair"], EXIT_USAGE, "needs --data"),
        "empty_data": ([a, b, "--model", model, "--normalize", "repair", "--data", str(empty)], EXIT_FILE,
                       "holds no samples"),
    }[case]
    before = paths["a"].read_bytes()
    assert main(["merge", *args, "--input-shape", SHAPE, "--out", str(tmp_path / "m.pt")]
                if case != "overwrite" else ["merge", *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("autoperm: error: ") and words in err and "Traceback" not in err
    assert paths["a"].read_bytes() == before and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("case", ["out_folder", "out_under_file", "device", "no_cuda", "batch_size", "alpha_nan",
                                  "nan_checkpoint", "garbage_checkpoint"])
def test_merge_errors_before_any_work(checkpoints, model_file, tmp_path, capsys, case):
    """Bad --out / --device / --batch-size / --alpha and unusable checkpoints fail with the exit
    code of cli.md's table and a message naming the option or file, before anything is written."""
    if case == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    paths, net = checkpoints
    a, b = str(paths["a"]), str(paths["b"])
    out = tmp_path / "m.pt"
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    nan = net.make().state_dict()
    nan["head.weight"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    args, code, words = {
        "out_folder": (["--out", str(tmp_path / "folder")], EXIT_OUTPUT, "is a folder: give a file name"),
        "out_under_file": (["--out", str(tmp_path / "file" / "m.pt")], EXIT_OUTPUT, "which is a file, not a folder"),
        "device": (["--device", "floppy", "--out", str(out)], EXIT_USAGE, "--device 'floppy' is not a device"),
        "no_cuda": (["--device", "cuda", "--out", str(out)], EXIT_USAGE, "no CUDA device"),
        "batch_size": (["--batch-size", "0", "--out", str(out)], EXIT_USAGE, "--batch-size: '0' is not a positive"),
        "alpha_nan": (["--alpha", "nan", "--out", str(out)], EXIT_USAGE, "--alpha: 'nan' is not a finite number"),
        "nan_checkpoint": (["--out", str(out)], EXIT_MISMATCH, "'head.weight' of B checkpoint"),
        "garbage_checkpoint": (["--out", str(out)], EXIT_FILE, "cannot read B checkpoint"),
    }[case]
    b = str(tmp_path / "nan.pt") if case == "nan_checkpoint" else str(tmp_path / "garbage.pt") \
        if case == "garbage_checkpoint" else b
    assert main(["merge", a, b, "--model", f"{model_file}:make", "--input-shape", SHAPE, *args]) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "internal error" not in err
    assert not out.exists() and list((tmp_path / "folder").iterdir()) == []


def test_console_script_reports_one_line_error(tmp_path):
    script = shutil.which("autoperm", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "autoperm"]
    result = subprocess.run(cmd + ["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model",
                                   "torchvision:resnet18"], capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_FILE
    assert result.stderr.strip() == f"autoperm: error: A checkpoint '{tmp_path / 'a.pt'}' not found"


def test_version_flag_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"autoperm {autoperm.__version__}"


@pytest.mark.parametrize("env, shown", [("1", True), ("0", False)])
def test_progress_lines_without_verbose(env, shown, checkpoints, model_file, tmp_path, monkeypatch, capfd):
    """Sinkhorn's steps report progress without -v where progress is on (a terminal, or
    AUTOPERM_PROGRESS=1; here without tqdm, as log lines), and stay quiet with AUTOPERM_PROGRESS=0."""
    import builtins
    import logging

    paths, _ = checkpoints
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("tqdm") else real_import(name, *a, **k))
    monkeypatch.setenv("AUTOPERM_PROGRESS", env)
    logger = logging.getLogger("autoperm.progress")
    level, handlers, root_handlers = logger.level, list(logger.handlers), list(logging.getLogger().handlers)
    logging.getLogger().handlers = [logging.StreamHandler()]   # what basicConfig installs in a fresh process
    try:
        assert main(["merge", str(paths["a"]), str(paths["b"]), "--model", f"{model_file}:make", "--method",
                     "sinkhorn", "--input-shape", SHAPE, "--out", str(tmp_path / "m.pt")]) == 0
        after = logger.level
    finally:
        logger.setLevel(level)
        logging.getLogger().handlers = root_handlers
        logger.handlers = handlers
    err = capfd.readouterr().err
    assert ("sinkhorn" in err.lower()) == shown
    assert after == level   # main() restores the level: a later call (or library use) is unaffected


def test_progress_lines_estimate_the_time_left(caplog):
    import logging
    import re

    from autoperm._progress import _status, progress, set_progress

    set_progress(False)   # log lines, not a bar
    try:
        with caplog.at_level(logging.INFO, logger="autoperm.progress"):
            assert list(progress(range(20), desc="steps")) == list(range(20))
    finally:
        set_progress(None)
    lines = [r.getMessage() for r in caplog.records if r.name == "autoperm.progress"]
    assert len(lines) == 10 and all(re.fullmatch(r"steps: \d+/20 \(\d+\.\d s, about \d+\.\d s left\)", m)
                                    for m in lines[:-1]), lines
    assert re.fullmatch(r"steps: 20/20 \(\d+\.\d s\)", lines[-1]), lines[-1]   # nothing left at the end
    assert _status(25, 100, 30.0) == "25/100 (30 s, about 90 s left)"
    assert _status(3, None, 500.0) == "3 (8 min)"
