"""`tinycifar sweep`: the file's checks, trials as run folders, resuming, pruning, and two workers
sharing one study through SQLite and through a real PostgreSQL server started here.

Without PostgreSQL's server programs the PostgreSQL test skips with the reason; under CI
(CI=true) it fails instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from cli_helpers import one_line, run_main
from optuna.trial import TrialState

from tinycifar.config import ConfigError
from tinycifar.training import sweep
from tinycifar.training.sweep import load_sweep, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP = """
preset = "fast"
trials = {trials}
seed = 0
[set]
epochs = 2
dataset = "synthetic"
synthetic_size = 200
batch_size = 50
threads = 1
precision = "fp32"
low_res = 0
[params.lr]
low = 0.01
high = 0.5
log = true
[params."aug.cutout_size"]
choices = [0, 8]
"""
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def sweep_file(folder: Path, trials: int = 3, name: str = "demo") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(SWEEP.format(trials=trials))
    return path


def study_of(storage: str, name: str = "demo") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize(("text", "fragment"), [
    ("presett = 'fast'\n[params.lr]\nlow = 0.1\nhigh = 1\n", "unknown key(s) ['presett']"),
    ("[params.lr]\nlow = 1\nhigh = 0.1\n", "expected numbers low < high"),
    ("[params.lr]\nlow = 0\nhigh = 1\nlog = true\n", "a log scale needs low > 0"),
    ("[params.lrr]\nlow = 0.1\nhigh = 1\n", "unknown option 'lrr'"),
    ("[params.lr]\nchoices = []\n", "choices must be a non-empty list"),
    ("objective = 'loss'\n[params.lr]\nlow = 0.1\nhigh = 1\n", "objective must be one of"),
    ("trials = 0\n[params.lr]\nlow = 0.1\nhigh = 1\n", "trials must be a positive integer"),
    ("preset = 'fast'\n", "[params] must name at least one config value"),
    ("[params\n", "not valid TOML"),
])
def test_bad_sweep_files_are_one_line(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    rc, _, err = run_main(capsys, ["sweep", path, "--out", tmp_path / "out"])
    one_line(rc, err, "bad.toml", fragment)
    assert not (tmp_path / "out").exists()


def test_trials_are_run_folders_and_a_stopped_sweep_resumes(tmp_path, capsys):
    path, out = sweep_file(tmp_path, trials=3), tmp_path / "out"
    rc, stdout, _ = run_main(capsys, ["sweep", path, "--out", out])
    assert rc == 0 and "Best: trial" in stdout
    storage = f"sqlite:///{out / 'study.db'}"
    trials = study_of(storage).trials
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state in FINISHED for t in trials)
    for t in trials:
        assert Path(t.user_attrs["run_dir"]) == out / f"trial-{t.number:04d}"
        assert (out / f"trial-{t.number:04d}" / "metrics.csv").is_file()
        assert 0.01 <= t.params["lr"] <= 0.5 and t.params["aug.cutout_size"] in (0, 8)
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("trial,state,final_acc,epochs,lr,aug.cutout_size,run") and len(lines) == 4
    assert (out / "results.png").stat().st_size > 10_000
    # the same command again: the study is complete, nothing new runs; --trials 4 adds one
    assert run_main(capsys, ["sweep", path, "--out", out])[0] == 0
    assert len(study_of(storage).trials) == 3
    assert run_main(capsys, ["sweep", path, "--out", out, "--trials", "4"])[0] == 0
    assert [t.number for t in study_of(storage).trials] == [0, 1, 2, 3]


def test_poor_trials_are_pruned_after_their_first_epoch(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, trials=2))
    study = run_sweep(spec, tmp_path / "out", pruner=optuna.pruners.ThresholdPruner(lower=101.0))
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for t in study.trials:  # stopped at the first report: one epoch in the run folder
        assert list(t.intermediate_values) == [1]
        assert len((Path(t.user_attrs["run_dir"]) / "metrics.csv").read_text().splitlines()) == 2


def two_workers(path: Path, out: Path, storage: str | None) -> None:
    argv = [sys.executable, "-m", "tinycifar", "sweep", str(path), "--out", str(out)]
    if storage:
        argv += ["--storage", storage]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for _ in range(2)]
    for w in workers:
        output, _ = w.communicate(timeout=600)
        assert w.returncode == 0, output[-3000:]


def assert_shared_without_loss_or_duplicates(study: optuna.Study, out: Path, wanted: int) -> None:
    trials = study.trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no trial number lost or used twice
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == len(trials) and wanted <= len(trials) <= wanted + 1  # at most one more: both at the end
    folders = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(folders)) == len(folders) and all((Path(f) / "metrics.csv").is_file() for f in folders)
    assert sorted(p.name for p in out.glob("trial-*")) == sorted(Path(f).name for f in folders)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path):
    path, out = sweep_file(tmp_path, trials=6), tmp_path / "out"
    two_workers(path, out, None)
    assert_shared_without_loss_or_duplicates(study_of(f"sqlite:///{out / 'study.db'}"), out, 6)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server of our own on 127.0.0.1 and a free port, in a temporary folder.

    The folder is made outside pytest's (which only root may enter): run as root, the server runs
    as the package's own user, since PostgreSQL refuses to run as root.
    """
    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the PostgreSQL test must run in CI: no /usr/lib/postgresql/*/bin (apt-get install postgresql)")
        pytest.skip("no PostgreSQL server programs (apt-get install postgresql)")
    data = Path(tempfile.mkdtemp(prefix="tinycifar-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "sweeper")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
        f"-p {port} -k {data} -h 127.0.0.1", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "sweeper", "sweeps")
        yield f"postgresql://sweeper@127.0.0.1:{port}/sweeps"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(tmp_path, postgres):
    path, out = sweep_file(tmp_path, trials=6), tmp_path / "out"
    two_workers(path, out, postgres)
    assert_shared_without_loss_or_duplicates(study_of(postgres), out, 6)
    assert not (out / "study.db").exists()  # the study lives in the server


def test_an_unreachable_storage_is_one_line(tmp_path, capsys):
    path = sweep_file(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run_main(capsys, ["sweep", path, "--out", tmp_path / "out", "--storage",
                                   f"postgresql://nobody@127.0.0.1:{port}/none"])
    one_line(rc, err, "--storage postgresql://nobody@127.0.0.1", "cannot open")


@pytest.mark.parametrize("message, races", [
    ('relation "studies" already exists', True),  # PostgreSQL: the other worker created the schema first
    ("permission denied for schema public", False),
])
def test_a_worker_that_loses_the_postgresql_schema_race_tries_again(tmp_path, monkeypatch, message, races):
    from sqlalchemy.exc import ProgrammingError
    calls = []

    def storage(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise ProgrammingError("CREATE TABLE studies", {}, Exception(message))
        return "opened"

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    if races:
        assert sweep.storage_for("postgresql://db/sweeps", tmp_path) == "opened" and len(calls) == 2
    else:
        with pytest.raises(ConfigError, match="--storage postgresql://db/sweeps: cannot open.*permission denied"):
            sweep.storage_for("postgresql://db/sweeps", tmp_path)
        assert len(calls) == 1


def test_the_readme_example_file_is_valid():
    assert load_sweep(Path(__file__).resolve().parent.parent / "examples" / "sweep_fast.toml").trials >= 1
