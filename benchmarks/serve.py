"""Serving benchmark (issue 15): one multitask server vs one server per task, over loopback HTTP.

Both sides answer the same requests: each request is one image for which every task's answer is wanted. The
multitask side sends it once to ``munet serve RUN`` (all tasks; requests arriving within a few ms are batched and the
components the tasks share run once per batch). The per-task side sends it to one ``munet serve RUN --tasks T``
server per task, one task after the other (the deployment without munet's sharing: a model per task; each of those
servers batches its own task's requests alike). Each level of concurrency (1, 8 and 64 clients) runs both sides in the
same process, one after the other, on the same requests: ``max(40, 4 x clients)`` of them (so each side sees several
waves of requests, not one), bounded in seconds. A last phase sends bad requests (truncated and huge images, wrong
content types, unknown tasks) alongside good ones and counts every answer: the server must keep answering the good
ones.

Every server is a subprocess with one torch thread; the clients are httpx coroutines in this process, on the same
cores (the per-task side makes one HTTP request per task, and pays for them here too). Images are random RGB PNGs
(their content does not change the work).

Usage::

    python benchmarks/serve.py --run RUN [--made-by "munet run ..."]   # about 1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path as FsPath
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

RESULTS = FsPath(__file__).resolve().parent / "results" / "serve" / "serve.json"
LEVELS = (1, 8, 64)
IMAGE_SIDE = 32


def png(seed: int, side: int = IMAGE_SIDE) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """``munet serve RUN --port 0 [--tasks T]`` in a subprocess (one torch thread); :meth:`wait` reads its address."""

    def __init__(self, run: str, tasks: list[str] | None = None):
        command = [sys.executable, "-m", "munet", "serve", run, "--port", "0"]
        command += ["--tasks", ",".join(tasks)] if tasks else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.url = ""

    def wait(self) -> Server:
        """Waits until the server listens (its first line names the address)."""
        line = self.process.stdout.readline()
        found = re.search(r"on (http://\S+)", line)
        if not found:
            self.process.kill()
            raise SystemExit(f"server did not start: {line}{self.process.stderr.read()}")
        self.url = found.group(1)
        return self

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def batch_stats(url: str) -> dict[str, float]:
    """Requests and images per forward batch so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics").text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    count = values.get("munet_serve_batch_requests_count", 0.0)
    return {"batches": count, "requests": values.get("munet_serve_batch_requests_sum", 0.0),
            "images": values.get("munet_serve_batch_images_sum", 0.0)}


async def load(urls: list[str], concurrency: int, max_requests: int, seconds: float, images: list[bytes]
               ) -> dict[str, Any]:
    """``concurrency`` clients send requests (each to every url in turn) until ``max_requests`` are sent or
    ``seconds`` have passed; throughput counts the answered requests over the time until the last answer."""
    latencies: list[float] = []
    failures = 0
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency * len(urls), max_keepalive_connections=concurrency * len(urls))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, failures
        while issued < max_requests and time.perf_counter() < deadline:
            image = images[issued % len(images)]
            issued += 1
            start = time.perf_counter()
            ok = True
            for url in urls:  # one task's server after the other (a single url: the multitask server)
                answer = await http.post(f"{url}/v1/predict", files=[("image", image)])
                ok = ok and answer.status_code == 200
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1

    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    ms = sorted(1000 * x for x in latencies)
    return {"requests": len(latencies), "failed": failures, "seconds": round(elapsed, 3),
            "throughput": round(len(latencies) / elapsed, 2),
            "p50_ms": round(statistics.median(ms), 2) if ms else None,
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2) if ms else None}


def bad_requests(tasks: list[str]) -> dict[str, dict[str, Any]]:
    """The bad request kinds: keyword arguments of ``httpx.AsyncClient.post``."""
    good = png(0)
    huge = io.BytesIO()
    Image.new("L", (6000, 6000)).save(huge, format="PNG")  # 36 M pixels in a small file
    return {
        "truncated image": {"files": [("image", good[: len(good) // 3])]},
        "huge image": {"files": [("image", huge.getvalue())]},
        "not an image": {"files": [("image", b"GIF89a, or rather not")]},
        "wrong content type": {"content": good, "headers": {"content-type": "image/png"}},
        "unknown task": {"files": [("image", good)], "data": {"task": "no_such_task"}},
        "bad base64": {"json": {"images": ["***"], "tasks": tasks[:1]}},
    }


async def under_bad_input(url: str, tasks: list[str], rounds: int, images: list[bytes]) -> dict[str, Any]:
    """``rounds`` rounds of every bad request kind, each beside 8 good requests; counts of every answer."""
    kinds = bad_requests(tasks)
    statuses: dict[str, dict[str, int]] = {kind: {} for kind in kinds}
    good = {"sent": 0, "ok": 0}
    async with httpx.AsyncClient(timeout=60) as http:
        for r in range(rounds):
            bad = [http.post(f"{url}/v1/predict", **request) for request in kinds.values()]
            fine = [http.post(f"{url}/v1/predict", files=[("image", images[(r + i) % len(images)])])
                    for i in range(8)]
            answers = await asyncio.gather(*bad, *fine, return_exceptions=True)
            for kind, answer in zip(kinds, answers):
                status = type(answer).__name__ if isinstance(answer, Exception) else str(answer.status_code)
                statuses[kind][status] = statuses[kind].get(status, 0) + 1
            good["sent"] += len(fine)
            good["ok"] += sum(not isinstance(a, Exception) and a.status_code == 200 for a in answers[len(kinds):])
        healthy = (await http.get(f"{url}/healthz")).status_code == 200
    return {"bad": {kind: {"sent": rounds, "status": s} for kind, s in statuses.items()}, "good": good,
            "healthy_after": healthy}


def markdown(results: dict[str, Any]) -> str:
    """The results as the table of benchmarks/README.md."""
    rows = ["| clients | multitask req/s | per-task req/s | ratio | multitask p50 / p99 ms | per-task p50 / p99 ms "
            "| requests per batch |", "|---|---|---|---|---|---|---|"]
    for level in results["levels"]:
        m, s = level["multitask"], level["per_task"]
        rows.append(f"| {level['clients']} | {m['throughput']} | {s['throughput']} | {level['ratio']}x | "
                    f"{m['p50_ms']} / {m['p99_ms']} | {s['p50_ms']} / {s['p99_ms']} | "
                    f"{level['requests_per_batch']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory to serve")
    parser.add_argument("--made-by", default=None, help="the command that made the run (recorded in the results)")
    parser.add_argument("--waves", type=int, default=4, help="requests per side and level: max(40, WAVES x clients)")
    parser.add_argument("--seconds", type=float, default=60.0, help="most seconds per side and level (default 60)")
    parser.add_argument("--bad-rounds", type=int, default=10, help="rounds of bad requests (default 10)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = parser.parse_args()

    started = time.time()
    load_start = os.getloadavg()  # other jobs on the machine share its cores
    multitask = Server(args.run).wait()
    listing = httpx.get(f"{multitask.url}/v1/tasks").json()
    tasks = [t["name"] for t in listing["tasks"]]
    single = [Server(args.run, [t]) for t in tasks]  # they load the run side by side
    for server in single:
        server.wait()
    images = [png(seed) for seed in range(64)]
    levels = []
    try:
        for server in [multitask, *single]:  # warm up: first requests pay for lazy initialisation
            for image in images[:4]:
                httpx.post(f"{server.url}/v1/predict", files=[("image", image)]).raise_for_status()
        for clients in LEVELS:
            count = max(40, args.waves * clients)
            before = batch_stats(multitask.url)
            together = asyncio.run(load([multitask.url], clients, count, args.seconds, images))
            after = batch_stats(multitask.url)
            alone = asyncio.run(load([s.url for s in single], clients, count, args.seconds, images))
            batches = after["batches"] - before["batches"]
            levels.append({"clients": clients, "multitask": together, "per_task": alone,
                           "ratio": round(together["throughput"] / alone["throughput"], 2),
                           "requests_per_batch": round((after["requests"] - before["requests"]) / batches, 1)})
            print(f"{clients:>3} clients: multitask {together['throughput']} req/s (p50 {together['p50_ms']} ms, "
                  f"p99 {together['p99_ms']} ms) vs per-task {alone['throughput']} req/s (p50 {alone['p50_ms']} ms,"
                  f" p99 {alone['p99_ms']} ms): {levels[-1]['ratio']}x", flush=True)
        robustness = asyncio.run(under_bad_input(multitask.url, tasks, args.bad_rounds, images))
    finally:
        for server in [multitask, *single]:
            server.stop()
    results = {
        "run": args.run, "made_by": args.made_by, "complete": listing["complete"],
        "tasks": {t["name"]: {"image_size": t["image_size"], "parameters": t["parameters"]} for t in listing["tasks"]},
        "request": f"one {IMAGE_SIDE}x{IMAGE_SIDE} RGB PNG, every task's answer",
        "threads": "one torch thread per server process; clients: httpx coroutines in the benchmark process",
        "cpus": os.cpu_count(), "load_average": {"start": load_start, "end": os.getloadavg()},
        "levels": levels, "bad_input": robustness,
        "wall_seconds": round(time.time() - started, 1),
    }
    out = FsPath(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(json.dumps(robustness, indent=1))
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
