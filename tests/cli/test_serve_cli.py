"""`bitsmith serve` as a user runs it: a real process on a free localhost port, a request in flight
when SIGTERM arrives (it completes: graceful shutdown), exit code 0; flag mistakes are one line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.tiny import make_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_then_shuts_down_gracefully(tmp_path) -> None:
    model = make_tiny_model(tmp_path / "m")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith.cli", "serve", str(model), "--port", str(port),
                             "--name", "tiny", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.2)
        result: dict = {}

        def long_request() -> None:
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": "the cat", "max_tokens": 200, "temperature": 1.0, "seed": 1})
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=long_request)
        t.start()
        while httpx.get(url + "/health").json()["active"] == 0 and t.is_alive():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert proc.wait(60) == 0
        assert result["status"] == 200 and result["body"]["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_flags_are_one_line_errors(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "bitsmith.cli", "serve", str(tmp_path / "missing"), "--port", "70000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: --port") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bitsmith.cli", "serve", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    for flags, first in ((["--draft", "w2g64", "--draft-k", "9"], "error: --draft-k"),
                         (["--prefill-chunk", "0"], "error: --max-batch, --max-tokens-default and --prefill-chunk")):
        r = subprocess.run([sys.executable, "-m", "bitsmith.cli", "serve", str(tmp_path / "missing"), *flags],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith(first) and "Traceback" not in r.stderr, r.stderr
