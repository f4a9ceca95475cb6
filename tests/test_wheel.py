"""The wheel a user installs, not the source tree every other test imports.

Every other test runs on an editable install, which hides a missing package-data line. Here the
sdist and the wheel are built (the wheel from the sdist, as ``python -m build`` does), checked by
twine, and the wheel is installed into a fresh virtual environment; its command line then runs
from a folder outside the repository, so nothing of the tree can leak in. The fresh environment
borrows this one's packages (torch and the serve extra) through a .pth file instead of
installing them again: a clean machine has them already, and that keeps the test to seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import httpx2 as httpx
import pytest
from serve_helpers import running_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = {"tinycifar/models": "*.toml", "tinycifar/serving/static": "*"}  # what pyproject.toml declares


def _clean_env() -> dict[str, str]:
    """This environment without what would put the source tree on the path (PYTHONPATH: its egg-info
    from the build would even pass for an installed tinycifar)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    out = subprocess.run(argv, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, argv))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist and wheel of this tree, built once for these tests, and passed by ``twine check``.

    Built from a copy of what the build reads, without any egg-info: setuptools keeps the file
    list of an old one, which would hide a package-data line gone missing."""
    out, tree = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)], cwd=out)
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, out.iterdir())], cwd=out)
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh environment holding the wheel (no dependencies) and seeing this one's packages."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root)
    python = root / "bin" / "python"
    (wheel,) = dist.glob("*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=root)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], cwd=root).strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "borrowed_packages.pth").write_text("".join(f"{p}\n" for p in borrowed))
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A working folder away from the repository (with _env, nothing of the tree is on the path)."""
    return tmp_path_factory.mktemp("outside")


def _env(venv: Path) -> dict[str, str]:
    env = _clean_env()
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def _members(path: Path) -> set[str]:
    if path.suffix == ".whl":
        return set(zipfile.ZipFile(path).namelist())
    with tarfile.open(path) as tar:  # names only: nothing is extracted
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_the_sdist_and_wheel_carry_the_package_data(dist, kind):
    names = _members(next(dist.glob(f"*.{kind}")))
    prefix = "src/" if kind == "tar.gz" else ""
    for folder, pattern in PACKAGE_DATA.items():
        expected = {f"{prefix}{p.relative_to(ROOT / 'src').as_posix()}"
                    for p in (ROOT / "src" / folder).glob(pattern) if p.is_file()}
        assert expected and expected <= names, f"missing from the {kind}: {sorted(expected - names)}"


def test_the_installed_package_is_the_wheel(venv, outside):
    where = _run([str(venv / "bin" / "python"), "-c", "import tinycifar; print(tinycifar.__file__)"], cwd=outside,
                 env=_env(venv))
    assert Path(where.strip()).is_relative_to(venv) and not Path(where.strip()).is_relative_to(ROOT)


def test_version_and_models(venv, outside):
    release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    env = _env(venv)
    assert _run(["tinycifar", "--version"], cwd=outside, env=env) == f"tinycifar {release}\n"
    listing = _run(["tinycifar", "models"], cwd=outside, env=env)
    assert {"era9", "fastnet", "slimres200k"} <= {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}


def test_check_uses_the_rules_shipped_in_the_wheel(venv, outside):
    out = _run(["tinycifar", "check", "--model", "fastnet"], cwd=outside, env=_env(venv))
    assert "against the rules of ERA V1 session 9" in out and "all 9 rules pass" in out


def test_train_report_and_serve_from_the_wheel(venv, outside):
    env, run = _env(venv), outside / "run"
    _run(["tinycifar", "train", "--dataset", "synthetic", "--set", "synthetic_size=64", "--epochs", "1",
          "--batch-size", "32", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--quiet",
          "--out", str(run)], cwd=outside, env=env)
    assert (run / "best.pt").is_file()
    page = _run(["tinycifar", "report", str(run)], cwd=outside, env=env)
    assert Path(page.removeprefix("report: ").strip()).is_file()
    serve = ["tinycifar", "serve", "--checkpoint", str(run / "best.pt"), "--threads", "1"]
    with running_server(serve, env=env, cwd=outside) as (url, _):
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "models": ["run"]}
        html = httpx.get(f"{url}/")
        assert html.status_code == 200 and "<title>" in html.text
        script = httpx.get(f"{url}/static/app.js")
        assert script.status_code == 200 and script.text == (ROOT / "src/tinycifar/serving/static/app.js").read_text()
