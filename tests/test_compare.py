"""`tinycifar compare`: runs of different lengths, unfinished runs, folders that hold no run."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_main
from tiny_run import train_tiny_run

from tinycifar.reports.compare import NotARun, read_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    short = train_tiny_run(root / "short")
    long = train_tiny_run(root / "long", model="fastnet", epochs=3, low_res=0)
    killed = train_tiny_run(root / "killed", epochs=2)
    (killed / "summary.json").unlink()  # as a run killed before its end leaves it
    return short, long, killed


def test_table_json_and_page(runs, tmp_path, capsys):
    short, long, killed = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_main(capsys, ["compare", short, long, killed, empty, tmp_path / "missing",
                                     "--out", tmp_path / "cmp", "--json"])
    rows = {r["run"]: r for r in json.loads(out)}
    assert rc == 0 and list(rows) == [str(short), str(long), str(killed)]
    assert rows[str(long)]["network"] == "fastnet" and rows[str(long)]["epochs"] == "3 of 3"
    assert rows[str(short)]["network"] == "era9" and rows[str(short)]["params"] == 195_410
    assert rows[str(killed)]["status"] == "unfinished" and rows[str(killed)]["epochs"] == "2 of 2"
    assert rows[str(killed)]["final_acc"] is not None and rows[str(killed)]["images_per_second"] is None
    assert rows[str(long)]["best_acc"] >= rows[str(long)]["final_acc"]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "empty: not a run folder" in lines[0] and "missing: not a folder" in lines[1]
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 10_000


def test_text_table(runs, tmp_path, capsys):
    rc, out, _ = run_main(capsys, ["compare", *runs[:2], "--out", tmp_path / "cmp"])
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["run", "preset", "network"]
    assert "195,410" in out and "finished" in out and "compare.html" in out


def test_nothing_to_compare_is_one_line(tmp_path, capsys):
    rc, _, err = run_main(capsys, ["compare", tmp_path, "--out", tmp_path / "cmp"])
    assert rc == 2 and "none of the folders holds a run" in err.strip().splitlines()[-1]


def test_a_checkpoint_folder_with_only_metrics_is_a_run(runs, tmp_path):
    (tmp_path / "metrics.csv").write_bytes((runs[0] / "metrics.csv").read_bytes())
    info = read_run(tmp_path)
    assert info.status == "unfinished" and info.network is None and len(info.history) == 1
    with pytest.raises(NotARun):
        read_run(tmp_path / "nope")


def test_a_finished_run_carries_its_calibration_and_the_networks_arguments(runs, tmp_path):
    summary = json.loads((runs[1] / "summary.json").read_text())
    info = read_run(runs[1])
    assert info.final_ece is not None and info.final_ece == summary["final_ece"]
    assert info.final_ece_tta == summary["final_ece_tta"]
    assert info.model_kwargs == {} and read_run(runs[2]).final_ece is None  # the killed run wrote no summary
    se = read_run(train_tiny_run(tmp_path / "se", model="slimres50k", model_kwargs={"se_reduction": 16}, low_res=0))
    assert se.model_kwargs == {"se_reduction": 16} and se.params == 52_418
