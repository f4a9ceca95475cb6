"""`tinycifar serve`'s API against generated input: Schemathesis reads the server's own
``/openapi.json`` and sends schema-valid and schema-violating requests to a real server process.

Every response must be no 5xx and must match what the description promises (status code, content
type, body schema); afterwards the server must still answer ``/healthz`` and must have left no
temporary file behind, neither in its own temporary folder nor as a deleted file held open.
Bounded: at most ``MAX_EXAMPLES`` requests per operation and mode, each with a timeout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from serve_helpers import png_bytes, running_server, served_checkpoint

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 30
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with a tiny checkpoint, its temporary files confined to a folder of its own."""
    root = tmp_path_factory.mktemp("fuzz")
    spool = root / "tmp"
    spool.mkdir()
    argv = [sys.executable, "-m", "tinycifar", "serve", "--checkpoint", str(served_checkpoint(root / "fast")),
            "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(spool)}
    with running_server(argv, env=env) as (url, proc):
        yield url, proc, spool


# Every operation of the API, and whether it takes input (without any, there is nothing to get wrong:
# no negative case exists). A new operation fails test_every_operation_is_fuzzed until it is listed.
OPERATIONS = {"GET /healthz": False, "GET /api/models": False, "GET /api/model": True, "GET /api/gallery": True,
              "POST /api/predict": True, "POST /api/predict-test": True}
# A schema-valid upload need not be an image (no schema can say "a decodable picture"): for it, the
# documented 400 naming each file is the right answer, not a valid request wrongly refused (and a
# well-formed but unknown model name the 404 that Schemathesis accepts anywhere else). Half of its
# positive cases upload real images instead, so that its 200 answers are checked too.
UPLOADS = {"POST /api/predict"}
CASES = [(op, mode) for op, takes_input in OPERATIONS.items()
         for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
         if takes_input or mode is schemathesis.GenerationMode.POSITIVE]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server[0]}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    described = [f"{result.ok().method.upper()} {result.ok().path}" for result in api_schema.get_all_operations()]
    assert sorted(described) == sorted(OPERATIONS)


def _requests(api_schema, operation: str, mode: schemathesis.GenerationMode):
    method, path = operation.split()
    described = api_schema[path][method]
    generated = described.as_strategy(generation_mode=mode)
    if operation not in UPLOADS or mode is not schemathesis.GenerationMode.POSITIVE:
        return generated
    images = {"file": [png_bytes(0), png_bytes(1, (20, 20))]}
    return generated | described.as_strategy(body=images, media_type="multipart/form-data")


@pytest.mark.parametrize("operation,mode", CASES, ids=[f"{op}-{mode.value}" for op, mode in CASES])
def test_every_operation_answers_as_described(api_schema, operation, mode):
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=_requests(api_schema, operation, mode))
    def answers_as_described(case):
        if operation in UPLOADS and mode is schemathesis.GenerationMode.POSITIVE:
            excluded = [schemathesis.checks.positive_data_acceptance]
            response = case.call_and_validate(timeout=REQUEST_TIMEOUT_S, excluded_checks=excluded)
            assert response.status_code in (200, 400, 404), response.text
        else:
            case.call_and_validate(timeout=REQUEST_TIMEOUT_S)

    answers_as_described()


def _deleted_files_held_open(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed between the listing and the read
            continue
    return [t for t in targets if t.endswith(" (deleted)")]


def test_afterwards_the_server_answers_and_left_no_temporary_file(server):
    url, proc, spool = server
    big = png_bytes(0, (700, 600))  # over Starlette's 1 MB: the upload is spooled to a temporary file
    assert len(big) > 1_100_000
    response = httpx.post(f"{url}/api/predict", files=[("file", ("big.png", big, "image/png"))], timeout=60)
    assert response.status_code == 200 and response.json()["results"][0]["filename"] == "big.png"
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert sorted(p.name for p in spool.iterdir()) == []
    if Path(f"/proc/{proc.pid}/fd").is_dir():  # Linux: an unlinked spool file would still be open
        assert _deleted_files_held_open(proc.pid) == []
