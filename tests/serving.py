"""Tests that start `qwen-edge serve` in a subprocess wait for it here."""
import time

import pytest


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
