"""``munet serve`` over real HTTP: a uvicorn server in a thread on a free loopback port, answering a tiny run."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import numpy as np
import pytest
import torch
from conftest import Crash, crashing_store, make_run
from PIL import Image

import munet
from munet.cli import main
from munet.errors import MunetError
from munet.serving.app import Limits, _resolve_tasks, create_app
from munet.serving.server import BackgroundServer
from munet.storage.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
JSON = "application/json"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides conftest's: connections to this machine's loopback address are allowed, any other fails."""
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address, *args, **kwargs):
        if not (isinstance(address, tuple) and address[0] in LOOPBACK):
            raise RuntimeError(f"network access attempted in a test: {address}")
        return connect(sock, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("serve") / "run"
    # μ = 0 and no block clones: both tasks' paths start with the same root components
    make_run(out, mutation_prob=0.0, clone_prob=0.0)
    return out


@pytest.fixture(scope="module")
def system(run_dir):
    return munet.load(run_dir)


@pytest.fixture(scope="module")
def server(system):
    # a wait long enough that the requests a test sends together always share a batch
    with BackgroundServer(create_app(system, limits=Limits(max_wait_ms=200, max_body_bytes=1 << 20))) as srv:
        yield srv


def _png(seed: int, size: int = 20, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tasks_health_and_metrics(server, system):
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").json() == {"status": "ok", "tasks": 2}
        tasks = client.get("/v1/tasks").json()
        assert tasks["complete"] is True and [t["name"] for t in tasks["tasks"]] == ["a", "b"]
        a = tasks["tasks"][0]
        assert a["classes"] == ["c0", "c1", "c2"] and a["image_size"] == 8
        assert a["parameters"] == system.path("a").num_params() and a["path_id"] == system.path("a").id
        client.post("/v1/predict", files=[("image", _png(0))])
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'munet_serve_requests_total{endpoint="/v1/predict",status="200"}' in text
    assert 'munet_serve_requests_total{endpoint="/v1/tasks",status="200"} 1.0' in text
    assert "munet_serve_request_seconds_bucket" in text and "munet_serve_batch_images_count" in text


def test_kept_alive_connections_answer_without_delay(server):
    """Responses on a kept-alive connection are not held back: without TCP_NODELAY on the server's connections each
    would wait about 40 ms for the client's delayed acknowledgement (20 requests: 0.8 s)."""

    with httpx.Client(base_url=server.url) as client:
        client.get("/healthz")
        start = time.perf_counter()
        for _ in range(20):
            client.get("/healthz")
        assert time.perf_counter() - start < 0.6


def test_predictions_equal_munet_predict(server, run_dir, tmp_path, capsys):
    """Multipart and base64 JSON answers equal `munet predict --task all --json` within 1e-5."""
    blobs = [_png(1), _png(2, size=13, mode="L")]
    files = []
    for i, blob in enumerate(blobs):
        files.append(tmp_path / f"img{i}.png")
        files[-1].write_bytes(blob)
    assert main(["predict", str(run_dir), "--task", "all", "--json", *map(str, files)]) == 0
    expected = {(r["file"], r["task"]): r for r in json.loads(capsys.readouterr().out)}
    with httpx.Client(base_url=server.url) as client:
        multipart = client.post("/v1/predict", files=[("image", b) for b in blobs], data={"task": "all"})
        as_json = client.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in blobs]})
        only_b = client.post("/v1/predict", json={"images": [base64.b64encode(blobs[1]).decode()], "tasks": ["b"]})
    for answer in (multipart, as_json):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["tasks"] == ["a", "b"] and len(body["predictions"]) == 2
        for i, prediction in enumerate(body["predictions"]):
            for task in ("a", "b"):
                want = expected[(str(files[i]), task)]
                assert prediction[task]["label"] == want["label"]
                assert np.abs(np.subtract(prediction[task]["probabilities"], want["probabilities"])).max() <= 1e-5
    assert only_b.json()["tasks"] == ["b"] and list(only_b.json()["predictions"][0]) == ["b"]
    assert abs(only_b.json()["predictions"][0]["b"]["probability"] - expected[(str(files[1]), "b")]["probability"]) \
        <= 1e-5


def test_mixed_task_requests_share_one_batch(server, system):
    """Concurrent requests for task a and task b form one batch in which the shared first block runs once."""
    paths = [system.path(t) for t in ("a", "b")]
    shared = paths[0].components["block_0"]
    assert shared is paths[1].components["block_0"]
    calls: list[int] = []
    heads: dict[str, list[int]] = {"a": [], "b": []}
    hooks = [shared.module.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))]
    for task, path in zip(("a", "b"), paths):
        hooks.append(path.components["head"].module.register_forward_hook(
            lambda module, inputs, output, rows=heads[task]: rows.append(len(output))))
    batches = server.app.state.metrics.batch_requests

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            return await asyncio.gather(
                client.post("/v1/predict", files=[("image", _png(3))], data={"task": "a"}),
                client.post("/v1/predict", files=[("image", _png(4)), ("image", _png(5))], data={"task": "b"}))

    before = batches.collect()[0].samples
    try:
        a, b = asyncio.run(together())
    finally:
        for hook in hooks:
            hook.remove()
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert list(a.json()["predictions"][0]) == ["a"] and len(b.json()["predictions"]) == 2
    assert calls == [3]  # one forward of the shared block, on the three images of both requests
    assert heads == {"a": [1], "b": [2]}  # each task's own head only on its own requests' images
    alone = {"a": system.predict([_png(3)], task="a"), "b": system.predict([_png(4), _png(5)], task="b")}
    for task, answer in (("a", a), ("b", b)):
        got = [p[task]["probabilities"] for p in answer.json()["predictions"]]
        assert np.abs(np.subtract(got, [p.probabilities for p in alone[task]])).max() <= 1e-5
    count = {s.name: s.value for s in batches.collect()[0].samples}["munet_serve_batch_requests_sum"]
    assert count - {s.name: s.value for s in before}["munet_serve_batch_requests_sum"] == 2


def test_bad_requests_get_clear_4xx_and_the_server_keeps_answering(server):
    good = _png(6)
    huge = io.BytesIO()
    Image.new("L", (5000, 4000)).save(huge, format="PNG")  # 20 M pixels, a small file
    large = io.BytesIO()
    Image.new("L", (4096, 4096)).save(large, format="PNG")  # the most pixels one image may have, a small file
    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)  # 900 M pixels: past PIL's bomb limit
    bomb = b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(data)) + kind + data
                                           + struct.pack(">I", zlib.crc32(kind + data))
                                           for kind, data in ((b"IHDR", header), (b"IEND", b"")))
    with httpx.Client(base_url=server.url) as client:
        cases = {
            "truncated": client.post("/v1/predict", files=[("image", good[: len(good) // 2])]),
            "not an image": client.post("/v1/predict", files=[("image", b"hello")]),
            "unknown task": client.post("/v1/predict", files=[("image", good)], data={"task": "zebra"}),
            "wrong type": client.post("/v1/predict", content=good, headers={"content-type": "image/png"}),
            "no images": client.post("/v1/predict", json={"tasks": ["a"]}),
            "bad base64": client.post("/v1/predict", json={"images": ["%%%"]}),
            "bad json": client.post("/v1/predict", content=b"{", headers={"content-type": JSON}),
            "huge image": client.post("/v1/predict", files=[("image", huge.getvalue())]),
            "oversized body": client.post("/v1/predict", files=[("image", bytes(2 << 20))]),
            "unknown field": client.post("/v1/predict", files=[("image", good)], data={"colour": "red"}),
            "chunked body": client.post("/v1/predict", content=iter([b"{}"]), headers={"content-type": JSON}),
            "long integer": client.post("/v1/predict", content=b'{"n": ' + b"9" * 5000 + b"}",
                                        headers={"content-type": JSON}),
            "deep nesting": client.post("/v1/predict", content=b"[" * 5000 + b"]" * 5000,
                                        headers={"content-type": JSON}),
            "all and unknown": client.post("/v1/predict", files=[("image", good)], data={"task": "all,zebra"}),
            "file as task": client.post("/v1/predict", files=[("image", good), ("task", ("a.png", good))]),
            "65 images": client.post("/v1/predict", files=[("image", good)] * 65),
            "66 images": client.post("/v1/predict", files=[("image", good)] * 66),
            "request pixels": client.post("/v1/predict", files=[("image", large.getvalue())] * 5),
            "bomb": client.post("/v1/predict", files=[("image", bomb)]),  # once 400 with PIL's words
            "empty task": client.post("/v1/predict", files=[("image", good)], data={"task": ""}),
            "commas only": client.post("/v1/predict", files=[("image", good)], data={"task": ","}),
            "empty json task": client.post("/v1/predict", json={"images": [base64.b64encode(good).decode()],
                                                                "tasks": ""}),
        }
        status = {name: r.status_code for name, r in cases.items()}
        assert status == {"truncated": 400, "not an image": 400, "unknown task": 400, "wrong type": 415,
                          "no images": 400, "bad base64": 400, "bad json": 400, "huge image": 413,
                          "oversized body": 413, "unknown field": 400, "chunked body": 411, "long integer": 400,
                          "deep nesting": 400, "all and unknown": 400, "file as task": 400, "65 images": 413,
                          "66 images": 413, "request pixels": 413, "bomb": 413, "empty task": 400,
                          "commas only": 400, "empty json task": 400}
        errors = {name: r.json()["error"] for name, r in cases.items()}
        assert "zebra" in errors["unknown task"] and "a, b" in errors["unknown task"]
        assert "multipart/form-data" in errors["wrong type"] and "5000x4000" in errors["huge image"]
        assert "cannot read image number 0: not an image file" in errors["not an image"]
        assert "BytesIO" not in errors["not an image"]  # PIL's message named the file object's repr
        assert "not valid JSON" in errors["long integer"] and "not valid JSON" in errors["deep nesting"]
        assert "zebra" in errors["all and unknown"] and "field 'task' holds a file" in errors["file as task"]
        assert "the limit is 64" in errors["65 images"] and "the limit is 64" in errors["66 images"]
        assert "5 images hold 83886080 pixels together" in errors["request pixels"]
        assert "image number 0 is too large to decode" in errors["bomb"]
        assert "the task field '' names no task" in errors["empty task"]  # once "unknown form field 'task'"
        assert "names no task" in errors["commas only"] and "names no task" in errors["empty json task"]  # once 200
        cut = b"--B\r\ncontent-disposition: form-data; name=image; filename=a.png\r\n\r\n" + good  # no --B--
        cut_short = client.post("/v1/predict", content=cut, headers={"content-type": "multipart/form-data; boundary=B"})
        assert cut_short.status_code == 400 and "closing boundary is missing" in cut_short.json()["error"]
        text_image = client.post("/v1/predict", files={"image": (None, "photo.png")})  # a part without a filename
        assert text_image.status_code == 400 and "holds text; send it as a file" in text_image.json()["error"]
        for response, status in ((client.get("/nope"), 404), (client.get("/v1/predict"), 405)):
            assert response.status_code == status and "routes: POST /v1/predict" in response.json()["error"]
        assert client.post("/v1/predict", files=[("image", good)]).status_code == 200
        assert [client.head(route).status_code for route in ("/v1/tasks", "/healthz", "/metrics")] == [200] * 3


def test_serve_command_answers(run_dir):
    """The real command in the foreground: `munet serve RUN --port 0` prints its address and answers there."""
    server = subprocess.Popen([sys.executable, "-m", "munet", "serve", str(run_dir), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = line.rsplit(" on ", 1)[-1].strip()
        assert line.startswith(f"serving {run_dir} (complete; tasks a, b) on http://127.0.0.1:"), line
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "tasks": 2}
        answer = httpx.post(f"{url}/v1/predict", files=[("image", _png(9))], data={"task": "b"})
        assert answer.status_code == 200 and answer.json()["tasks"] == ["b"]
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown
        server.wait(timeout=60)
    assert server.returncode == 0 and server.stderr.read().strip() == "server stopped"


@pytest.mark.parametrize("empty", [",", ""])
def test_serve_tasks_naming_no_task_are_refused(run_dir, capsys, monkeypatch, empty):
    """`--tasks ,` (or an empty variable) once served every task."""
    import munet.serving.server

    monkeypatch.setattr(munet.serving.server, "serve", lambda *args, **kwargs: None)  # no server: fails, not hangs
    assert main(["serve", str(run_dir), "--tasks", empty, "--port", "0"]) == 2
    assert "names no task" in capsys.readouterr().err


def test_serve_command_errors(run_dir, capsys):
    assert main(["serve", str(run_dir), "--tasks", "zebra", "--port", "0"]) == 2
    assert "no task 'zebra'" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", str(run_dir / "missing"), "--port", "0"]) == 2
    assert "error:" in capsys.readouterr().err
    for wait in ("inf", "nan", "-1"):  # a batch waiting forever would leave every request unanswered
        assert main(["serve", str(run_dir), "--port", "0", "--max-wait-ms", wait]) == 2
        assert "the batch wait (--max-wait-ms) must be in 0-10000 ms" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--port", "0", "--max-batch", "0"]) == 2
    assert "serving limits must be >= 1: max_batch_images = 0" in capsys.readouterr().err
    with pytest.raises(MunetError, match="must be in 0-10000 ms, got inf"):  # the API's bound, not just the CLI's
        Limits(max_wait_ms=float("inf"))
    for timeout in ("0", "inf", "nan"):  # no time to read any body, or a stalled body holding its connection forever
        assert main(["serve", str(run_dir), "--port", "0", "--read-timeout-s", timeout]) == 2
        assert "the read timeout (--read-timeout-s) must be in (0, 3600] s" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_serve_command_without_the_extra(run_dir):
    """Without the serve extra's packages the command says how to install them (exit 2, no traceback)."""
    hide = "import sys; sys.modules['fastapi'] = None; from munet.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", hide, "serve", str(run_dir)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "pip install -e .[serve]" in done.stderr and "Traceback" not in done.stderr


def test_a_task_value_is_a_task_name_before_it_is_a_comma_separated_list():
    """A split: task is named with commas (split:uci_digits:0,1,2): a form field holding that name asked for three
    unknown tasks, since every value was split at commas first."""
    served = ["split:uci_digits:0,1,2", "a", "b"]
    assert _resolve_tasks(["split:uci_digits:0,1,2"], served) == ["split:uci_digits:0,1,2"]
    assert _resolve_tasks(["b,a", "a"], served) == ["b", "a"]
    assert _resolve_tasks(["all"], served) == served


def test_a_run_still_training_is_served_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):  # the run stops after its third checkpoint, as a process killed mid-run
        make_run(out, crashing_store("commit", 3, keep_on_failure=True), mutation_prob=0.0,
                 clone_prob=0.0)
    with Store.open(out, write=True):  # and a training process holds the run's lock again
        system = munet.load(out)
        with BackgroundServer(create_app(system)) as srv, httpx.Client(base_url=srv.url) as client:
            listed = client.get("/v1/tasks").json()
            answer = client.post("/v1/predict", files=[("image", _png(7))])
    assert listed["complete"] is False and listed["tasks"]
    assert answer.status_code == 200 and answer.json()["tasks"] == [t["name"] for t in listed["tasks"]]


def test_a_failing_batch_is_a_500_for_its_requests_alone(system):
    """A task the server lists but the run lacks fails inside the batch: those requests get 500, the server goes on."""
    with BackgroundServer(create_app(system, tasks=["a", "ghost"])) as srv, httpx.Client(base_url=srv.url) as client:
        failed = client.post("/v1/predict", files=[("image", _png(8))], data={"task": "ghost"})
        fine = client.post("/v1/predict", files=[("image", _png(8))], data={"task": "a"})
        metrics = client.get("/metrics").text
    assert failed.status_code == 500 and "ghost" in failed.json()["error"]
    assert fine.status_code == 200 and list(fine.json()["predictions"][0]) == ["a"]
    assert 'munet_serve_requests_total{endpoint="/v1/predict",status="500"} 1.0' in metrics


def _slow(images, tasks, wanted):
    """A batch that takes a while (so that requests queue up meanwhile), answering class "x" everywhere."""

    from munet.predict import Prediction

    time.sleep(0.2)
    return {t: [Prediction("x", 0, 1.0, [1.0]) for _ in wanted[t]] for t in tasks}


def test_a_full_queue_refuses_requests():
    """With one request in the batch and one waiting (max_queue 1), a third is refused; the first two are answered."""
    from munet.serving.batcher import Batcher, QueueFull
    from munet.serving.metrics import ServeMetrics

    slow = _slow

    async def three() -> list:
        batcher = Batcher(slow, ServeMetrics(), max_wait_s=0.0, max_images=1, max_queue=1)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([torch.zeros(1, 1, 4, 4)], ["t"]))
        await asyncio.sleep(0.05)  # the worker has taken the first request into its batch
        answers = await asyncio.gather(first, batcher.submit([torch.zeros(1, 1, 4, 4)], ["t"]),
                                       batcher.submit([torch.zeros(1, 1, 4, 4)], ["t"]), return_exceptions=True)
        await batcher.stop()
        return answers

    first, second, third = asyncio.run(three())
    assert first["t"][0].label == second["t"][0].label == "x" and isinstance(third, QueueFull)


def test_requests_queued_during_a_batch_form_the_next_one_without_waiting():
    """With no wait (max_wait 0), the requests that queued while a batch ran still go together into the next."""
    from munet.serving.batcher import Batcher
    from munet.serving.metrics import ServeMetrics

    metrics = ServeMetrics()

    async def four() -> None:
        batcher = Batcher(_slow, metrics, max_wait_s=0.0, max_images=8, max_queue=8)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit([torch.zeros(1, 1, 4, 4)], ["t"]))
        await asyncio.sleep(0.05)  # the first batch runs; three requests queue meanwhile
        await asyncio.gather(first, *(batcher.submit([torch.zeros(1, 1, 4, 4)], [f"t{i}"]) for i in range(3)))
        await batcher.stop()

    asyncio.run(four())
    samples = {s.name: s.value for s in metrics.batch_requests.collect()[0].samples}
    assert samples["munet_serve_batch_requests_count"] == 2 and samples["munet_serve_batch_requests_sum"] == 4


def test_a_request_that_stalls_is_cut_off_and_the_server_keeps_answering(system):
    """A client that declares a body and stops sending it mid-way is answered 408 once the read timeout passes, and
    one that never finishes its headers is disconnected, instead of holding its connection as long as it likes."""
    body = json.dumps({"images": [base64.b64encode(_png(6)).decode()]}).encode()
    with BackgroundServer(create_app(system, limits=Limits(read_timeout_s=0.3))) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as client:  # raw: httpx would not read early
            client.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n" % len(body) + body[:10])
            answer = b""
            while chunk := client.recv(65536):  # until the server closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"the request body did not arrive within 0.3 s; send it whole and promptly"' in answer
        with socket.create_connection((host, int(port)), timeout=10) as client:  # headers that never end
            client.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            start = time.monotonic()
            assert client.recv(65536) == b"" and time.monotonic() - start < 5  # closed after 0.3 s, unanswered
        with socket.create_connection((host, int(port)), timeout=10) as client:  # the same after a kept-alive answer
            client.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"}"):  # the head and the JSON body may come in two packets
                reply += client.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 ")
            client.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert client.recv(65536) == b""
        assert httpx.post(f"{srv.url}/v1/predict", content=body, headers={"content-type": JSON}).status_code == 200


def test_a_content_length_that_is_no_number_is_a_400():
    from starlette.requests import Request

    from munet.serving.app import RequestError, _check_length

    request = Request({"type": "http", "method": "POST", "headers": [(b"content-length", b"12x")]})
    with pytest.raises(RequestError) as caught:  # was a 413 "(12x bytes) exceeds the limit"
        _check_length(request, 1000)
    assert caught.value.status == 400 and "'12x' is not a number of bytes" in caught.value.message
