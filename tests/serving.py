"""Tests that start `qwen-edge serve` in a subprocess: `cli_server(folder, *options)` starts it on a free port, waits
for /health and stops it afterwards."""
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).parent / "qwen-edge")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc, url: str, seconds: float = 60) -> None:
    """Poll `url`/health until it answers 200; fail with the server's stderr if it exits or takes too long."""
    import httpx  # here: test_draft skips its server test when httpx is absent

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stderr.read()}")
        time.sleep(0.2)


@contextlib.contextmanager
def cli_server(folder, *options: str, seconds: float = 60):
    """`qwen-edge serve folder --port P *options` running until the block ends; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([EXE, "serve", str(folder), "--port", str(port), *options],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, seconds)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
