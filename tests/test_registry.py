"""Model specs: registered names, plugins, file.py:factory, module:factory; one line for every way to fail."""

from __future__ import annotations

import json
import sys
import textwrap
import types
from pathlib import Path

import pytest
from cli_helpers import one_line, run_main
from torch import nn

from tinycifar.config import parse_assignments, resolve_config
from tinycifar.models import ModelError, build_model, create_model, plugins
from tinycifar.models.registry import ModelSource, parse_spec, short_name, source_of_instance

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def small(width=4):
    return Net(width)
"""


def write(tmp_path: Path, text: str, name: str = "my_net.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path




@pytest.mark.parametrize(("spec", "expected"), [
    ("era9", ("name", "era9", "")),
    ("nets/my_net.py:Net", ("file", "nets/my_net.py", "Net")),
    ("my_net.py", ("file", "my_net.py", "Net")),  # the course's convention: class Net
    ("pkg.nets:build", ("module", "pkg.nets", "build")),
    ("./net:make", ("file", "./net", "make")),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_file_spec_class_and_function_with_keyword_arguments(tmp_path):
    path = write(tmp_path, GOOD_NET)
    model, source = build_model(f"{path}:Net", {"width": 6})
    assert model.conv.out_channels == 6
    assert source == ModelSource(f"{path}:Net", "file", str(path.resolve()), source.sha256)
    assert len(source.sha256) == 64 and source.is_user_code
    assert build_model(f"{path}:small")[0].conv.out_channels == 4
    assert build_model(str(path))[0].conv.out_channels == 8  # file.py alone means file.py:Net


def test_the_same_content_is_imported_once_and_an_edit_is_seen(tmp_path):
    path = write(tmp_path, GOOD_NET)
    a, _ = build_model(f"{path}:Net")
    b, _ = build_model(f"{path}:Net")
    assert type(a) is type(b)
    path.write_text(GOOD_NET.replace("width=8", "width=5"))
    c, source = build_model(f"{path}:Net")
    assert c.conv.out_channels == 5 and type(c) is not type(a)
    assert source.sha256 == build_model(f"{path}:small")[1].sha256  # both hash the current file


def test_a_file_may_import_its_neighbours(tmp_path):
    write(tmp_path, "from torch import nn\nWIDTH = 7\n", "blocks.py")
    path = write(tmp_path, "from blocks import WIDTH\n" + GOOD_NET.replace("width=8", "width=WIDTH"))
    assert build_model(f"{path}:Net")[0].conv.out_channels == 7


def test_module_spec(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write(package, GOOD_NET, "nets.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, source = build_model("mypkg.nets:small")
    assert model.conv.out_channels == 4
    assert source.kind == "module" and source.path.endswith("nets.py") and source.sha256


def test_plugin_registered_under_the_entry_point_group(tmp_path, monkeypatch):
    write(tmp_path, GOOD_NET, "plugnets.py")
    dist = tmp_path / "plugnets-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugnets\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tinycifar.models]\nplugnet = plugnets:small\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugnet" in plugins()
    model, source = build_model("plugnet")
    assert model.conv.out_channels == 4 and source.kind == "plugin" and not source.is_user_code
    assert resolve_config("fast", overrides={"model": "plugnet"}).model == "plugnet"


def test_models_lists_plugins_beside_the_built_in_networks(tmp_path, monkeypatch, capsys):
    test_plugin_registered_under_the_entry_point_group(tmp_path, monkeypatch)
    rc, out, _ = run_main(capsys, ["models", "--json"])
    rows = {r["model"]: r for r in json.loads(out)}
    assert rc == 0 and rows["plugnet"]["source"] == "plugin plugnets:small"
    assert rows["plugnet"]["params"] == 3 * 4 * 9 + 4 + 4 * 10 + 10
    assert rows["era9"]["source"] == "built in"


def test_model_kwargs_from_set_and_model_arg():
    values = parse_assignments(["model_kwargs.width=48", "model_kwargs.name=wide"])
    assert values == {"model_kwargs": {"width": 48, "name": "wide"}}
    cfg = resolve_config("fast", {"model_kwargs": {"width": 32, "depth": 2}}, values)
    assert cfg.model_kwargs == {"width": 48, "depth": 2, "name": "wide"}  # layers merge


def test_instance_source_points_at_its_class_file():
    source = source_of_instance(nn.Sequential())
    assert source.kind == "instance" and source.spec.endswith(":Sequential") and source.path
    assert source_of_instance(create_model("era9")) == ModelSource("era9", "builtin")


def test_instance_of_a_class_written_in_a_notebook_cell(monkeypatch):
    """A Jupyter kernel's __main__ has no __file__: inspect then raises OSError, not TypeError."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    cell_class = type("Net", (nn.Module,), {"__module__": "__main__"})
    assert source_of_instance(cell_class()) == ModelSource("__main__:Net", "instance", None, None)


def test_short_name_is_fit_for_a_folder():
    assert short_name("era9") == "era9"
    assert short_name("some/dir/my_net.py:Net") == "my_net.Net"
    assert short_name("pkg.nets:Wide") == "nets.Wide"


BROKEN = {
    "syntax error": ("def Net(:\n", "Net", ["failed to import", "SyntaxError", "line 1"]),
    "import error": ("import not_a_module_anywhere\n", "Net", ["failed to import", "ModuleNotFoundError"]),
    "raises at import": ("x = 1\nraise RuntimeError('boom')\n", "Net", ["failed to import", "boom", "line 2"]),
    "missing factory": ("from torch import nn\nclass Other(nn.Module): pass\n", "Net",
                        ["has no 'Net'", "it defines: Other"]),
    "factory raises": ("def Net():\n    raise ValueError('bad width')\n", "Net", ["raised ValueError", "bad width"]),
    "not a module": ("def Net():\n    return 42\n", "Net", ["returned int, not an nn.Module"]),
    "wrong output": ("from torch import nn\ndef Net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 7))\n",
                     "Net", ["2x7", "expected 2x10"]),
    "forward fails": ("from torch import nn\ndef Net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(5, 10))\n",
                      "Net", ["forward on a 2x3x32x32 batch raised RuntimeError"]),
    "not callable": ("Net = 3\n", "Net", ["is a int, not a class or function"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("command", ["train", "check", "summary"])
def test_every_broken_network_is_one_line_naming_the_file(tmp_path, capsys, case, command):
    source, factory, fragments = BROKEN[case]
    path = write(tmp_path, source)
    argv = [command, "--model", f"{path}:{factory}"]
    if command == "train":
        argv += ["--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "run")]
    rc, _, err = run_main(capsys, argv)
    one_line(rc, err, str(path.name), *fragments)
    assert not (tmp_path / "run").exists()  # nothing written for a network that cannot be built


@pytest.mark.parametrize(("spec", "fragment"), [
    ("nope", "unknown model 'nope'"),
    ("missing.py:Net", "missing.py not found"),
    ("mod:not-a-name", "is not a Python name"),
    ("not_an_installed_module_x:Net", "failed to import"),
])
def test_bad_specs(capsys, spec, fragment):
    rc, _, err = run_main(capsys, ["summary", "--model", spec])
    one_line(rc, err, fragment)


def test_a_factory_told_its_class_count_must_honour_it(tmp_path):
    path = write(tmp_path, GOOD_NET.replace("nn.Linear(width, num_classes)", "nn.Linear(width, 10)"))
    assert build_model(f"{path}:Net")[0].fc.out_features == 10
    with pytest.raises(ModelError, match="expected 2x7"):
        build_model(f"{path}:Net", {"num_classes": 7})


def test_summary_of_a_file_network(tmp_path, capsys):
    path = write(tmp_path, GOOD_NET)
    rc, out, _ = run_main(capsys, ["summary", "--model", f"{path}:Net", "--model-arg", "width=12"])
    assert rc == 0
    assert "conv" in out and f"{path}:Net: " in out and f"{3 * 12 * 9 + 12 + 12 * 10 + 10:,} parameters" in out
