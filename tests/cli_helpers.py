"""Running the command line in-process, and the shape every bad-input error must have."""

from __future__ import annotations

from tinycifar.cli import main


def run_main(capsys, argv: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``tinycifar ARGV``; paths may be given as Path objects."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line(rc: int, err: str, *fragments: str) -> str:
    """Exit code 2, one line on stderr, no traceback, holding every fragment; returns the line."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
