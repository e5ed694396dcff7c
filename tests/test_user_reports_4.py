"""Regressions from the fourth new-user trial: submodules the docs call after a bare ``import
autoperm``, a single tensor given to the checks, submodule train / eval modes kept by permute and
merge, and command-line messages for unreadable files and model files."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import autoperm
from autoperm.__main__ import main
from autoperm.cli import EXIT_DEPENDENCY, EXIT_FILE, EXIT_MODEL, EXIT_USAGE


def test_documented_submodules_load_on_first_use():
    """`autoperm.zoo.load`, `autoperm.viz.render_spec` and `autoperm.cli.main` raised
    AttributeError after a bare `import autoperm` (a fresh interpreter: nothing imported them)."""
    code = ("import sys, autoperm\n"
            "assert 'autoperm.zoo' not in sys.modules\n"
            "assert callable(autoperm.zoo.load) and callable(autoperm.viz.render_spec) and callable(autoperm.cli.main)\n"
            "try:\n    autoperm.no_such_thing\nexcept AttributeError as e:\n    print('refused', e)\n"
            "assert not hasattr(autoperm, 'foo.bar') and not hasattr(autoperm, '.')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused module 'autoperm' has no attribute 'no_such_thing'" in out.stdout


def test_model_file_imports_the_module_beside_it(tmp_path):
    """A model file importing a sibling file failed ("imports 'blocks', which is not installed"):
    the file's folder was not on the import path, as it is for `python net.py`."""
    (tmp_path / "blocks_xyz.py").write_text("from torch import nn\n\ndef block():\n    return nn.Linear(4, 3)\n")
    (tmp_path / "net.py").write_text("from torch import nn\nfrom blocks_xyz import block\n\n"
                                     "def make():\n    return nn.Sequential(block(), nn.ReLU(), nn.Linear(3, 2))\n")
    before = list(sys.path)
    model, _ = autoperm.zoo.load(f"{tmp_path / 'net.py'}:make")
    assert isinstance(model[0], nn.Linear) and sys.path == before


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_checks_take_a_single_tensor():
    """verify_spec / check_equivalence split a bare Tensor along its batch (5 arguments for a
    batch of 4; a batch of 1 ran on an unbatched row)."""
    m = _mlp().eval()
    x = torch.randn(4, 10)
    spec = autoperm.trace(m, x)
    assert autoperm.verify_spec(m, spec, x).error == autoperm.verify_spec(m, spec, (x,)).error < 1e-12
    perms = autoperm.random_permutation(spec, 1)
    assert autoperm.check_equivalence(m, spec, perms, x) == autoperm.check_equivalence(m, spec, perms, (x,))
    # negative control: a spec missing the next layer's input axis is caught, given a bare Tensor
    d = spec.to_dict()
    d["groups"][0]["axes"] = [a for a in d["groups"][0]["axes"] if a["tensor"] != "3.weight"]
    unsound = autoperm.PermutationSpec.from_dict(d)
    assert autoperm.check_equivalence(m, unsound, autoperm.random_permutation(unsound, 1, derangement=True), x) > 1e-3
    report = autoperm.verify_spec(m, unsound, x, raise_on_failure=False)
    assert report.error > 1e-3 and set(report.failing) == {spec.groups[0].name}


def test_permute_and_merge_keep_submodule_modes():
    """A BatchNorm frozen in eval inside a model in training mode came back in training mode
    from permute / merge, so the permuted copy computed another function (error 0.4)."""
    m = _mlp()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    m.train()
    m[1].eval()
    x = torch.randn(6, 10)
    spec = autoperm.trace(m, x)
    p = autoperm.permute(m, spec, autoperm.random_permutation(spec, 1, derangement=True))
    assert p.training and not p[1].training and m.training and not m[1].training
    torch.manual_seed(3)
    ref = m(x)
    assert torch.allclose(p(x), ref, atol=1e-5)
    merged = autoperm.merge(m, p, spec=spec)
    assert merged.training and not merged[1].training
    assert torch.allclose(merged(x), ref, atol=1e-5), "merging with a permuted copy gives the model back"
    p[1].train()  # negative control: the BatchNorm in training mode uses batch statistics
    assert not torch.allclose(p(x), ref, atol=1e-3)


MODEL = "import torch\nfrom torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    (tmp_path / "three.py").write_text("def make():\n    return 3\n")
    (tmp_path / "needs.py").write_text("import no_such_package_xyz\n\ndef make():\n    pass\n")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save(model, tmp_path / "whole.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.randn(16, 4), tmp_path / "inputs.pt")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", ["whole", "text", "folder", "three", "needs", "ste", "shape", "out"])
def test_cli_messages_name_the_file_and_the_fix(files, capsys, case):
    d = files
    merge = ["merge", str(d / "a.pt"), str(d / "a.pt"), "--model", f"{d / 'net.py'}:make", "--out",
             str(d / "m.pt")]
    argv, code, words = {
        "whole": (["merge", str(d / "a.pt"), str(d / "whole.pt"), "--model", f"{d / 'net.py'}:make"], EXIT_FILE,
                  ["'" + str(d / "whole.pt") + "' holds pickled Python objects", "save model.state_dict()"]),
        "text": (["merge", str(d / "a.pt"), str(d / "text.pt"), "--model", f"{d / 'net.py'}:make"], EXIT_FILE,
                 ["is not a state_dict saved by torch.save"]),
        "folder": (merge + ["--normalize", "reset", "--data", str(d / "folder")], EXIT_FILE,
                   ["is a folder: give the file inside it"]),
        "three": (["merge", str(d / "a.pt"), str(d / "a.pt"), "--model", f"{d / 'three.py'}:make"], EXIT_MODEL,
                  ["returned int, not a torch.nn.Module"]),
        "needs": (["merge", str(d / "a.pt"), str(d / "a.pt"), "--model", f"{d / 'needs.py'}:make"], EXIT_DEPENDENCY,
                  ["needs.py' imports 'no_such_package_xyz', which is not installed"]),
        "ste": (merge + ["--method", "ste", "--data", str(d / "inputs.pt")], EXIT_USAGE,
                ["--method ste", "needs targets", "(inputs, targets) tuple"]),
        "shape": (["spec", f"{d / 'net.py'}:make", "--input-shape", "-1,4"], EXIT_USAGE,
                  ["'-1,4' is not a shape"]),
        "out": (["spec", f"{d / 'three.py'}:make", "--out", str(d / "s.txt")], EXIT_USAGE,
                ["use a .json, .dot, .svg or .png file name"]),   # refused before the model is built
    }[case]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "\x1b[" not in err and "Traceback" not in err
    assert not (d / "m.pt").exists()


def test_zoo_load_of_a_file_mlp_gives_inputs_it_accepts(tmp_path):
    """zoo.load('file.py:factory') of an MLP returned 3x224x224 images it cannot read (the CLI
    already guessed from the first layer). Control: a conv model still gets images."""
    (tmp_path / "fm.py").write_text("from torch import nn\n\ndef mlp():\n    return nn.Sequential(nn.Linear(4, 8), "
                                    "nn.ReLU(), nn.Linear(8, 2))\n\ndef cnn():\n    return nn.Sequential("
                                    "nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), "
                                    "nn.Linear(4, 2))\n")
    for size in (None, 16):
        model, (x,) = autoperm.zoo.load(f"{tmp_path / 'fm.py'}:mlp", image_size=size)
        assert x.shape[1:] == (4,) and model(x).shape == (x.shape[0], 2)
    model, (x,) = autoperm.zoo.load(f"{tmp_path / 'fm.py'}:cnn", image_size=16)
    assert x.shape[1:] == (1, 16, 16) and model(x).shape == (x.shape[0], 2)
