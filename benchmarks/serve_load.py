"""Load on `tinycifar serve`: concurrent clients against 127.0.0.1, requests/s, latency, errors.

For each engine (PyTorch fp32, ONNX Runtime int8), with and without Grad-CAM, one server process
is started exactly as a user starts it, and ``--clients`` threads post one image each request to
``/api/predict`` for ``--seconds``; every response must be a 200 with a prediction. The traffic goes
to 127.0.0.1 only and is bounded in time and count (``--max-requests`` per configuration).
Clients and server share the machine's cores, which is what a demo on a laptop does too.

    python benchmarks/serve_load.py --checkpoint runs/fast-default/best.pt --clients 16 --seconds 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table  # noqa: E402

from tinycifar.checkpoint import load_checkpoint  # noqa: E402
from tinycifar.serving.inference import run_split  # noqa: E402

ENGINES = {"pytorch": [], "onnxruntime-int8": ["--engine", "onnxruntime", "--int8"]}


def upload_image(checkpoint: Path, data: str | None) -> bytes:
    """A CIFAR-10 test image enlarged to 256x256 and saved as JPEG: a typical small upload."""
    test = run_split(load_checkpoint(checkpoint)["config"], train=False, data=data)
    image = Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).resize((256, 256), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def start_server(args, engine_args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tinycifar", "serve", "--checkpoint", str(args.checkpoint), "--port", str(port),
           "--host", "127.0.0.1", *engine_args, *(["--model", args.model] if args.model else []),
           *(["--data", args.data] if args.data else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def load(url: str, image: bytes, clients: int, seconds: float, gradcam: bool, max_requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop:
                with lock:
                    if len(latencies) + len(errors) >= max_requests:
                        return
                t0 = time.perf_counter()
                try:
                    r = c.post("/api/predict", params={"gradcam": int(gradcam)},
                               files={"file": ("photo.jpg", image, "image/jpeg")})
                    ok = r.status_code == 200 and r.json()["results"][0]["top"]
                    problem = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    problem = type(e).__name__
                with lock:
                    (errors.append(problem) if problem else latencies.append(time.perf_counter() - t0))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")
    return {"requests": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
            "requests/s": round(len(latencies) / elapsed, 1),
            "p50 latency (ms)": round(1000 * statistics.median(ordered), 1) if ordered else None,
            "p99 latency (ms)": round(1000 * p99, 1) if ordered else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--model", default=None, help="the network's file, for a checkpoint of your own network")
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default: the run's own, else $CIFAR10_ROOT)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each configuration's load")
    ap.add_argument("--max-requests", type=int, default=20_000, help="bound per configuration")
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    ap.add_argument("--out", default="benchmarks/results/serve_load")
    args = ap.parse_args()

    image = upload_image(args.checkpoint, args.data)
    rows = []
    for engine in args.engines:
        proc, url = start_server(args, ENGINES[engine])
        try:
            load(url, image, args.clients, 2.0, False, args.max_requests)  # warm-up
            for gradcam in (False, True):
                row = {"engine": engine, "Grad-CAM": "yes" if gradcam else "no", "clients": args.clients,
                       **load(url, image, args.clients, args.seconds, gradcam, args.max_requests)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    report = {"command": command_line(), "machine": machine_info(), "checkpoint": str(args.checkpoint),
              "upload": f"{len(image):,}-byte JPEG, 256x256", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# Load on tinycifar serve", "", f"Command: `{report['command']}`", "",
          f"Checkpoint `{args.checkpoint}`; each request uploads one {report['upload']}; clients and server on "
          f"the same {os.cpu_count()}-core machine, over 127.0.0.1.", "",
          markdown_table(rows, list(rows[0])), ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    if any(r["errors"] for r in rows):
        raise SystemExit("errors under load")


if __name__ == "__main__":
    main()
