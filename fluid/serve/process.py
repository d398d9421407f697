"""``python -m fluid.serve`` as a child process on 127.0.0.1 (a free port), for scripts and tests:
started and waited for (``/health``) with a deadline, stopped with SIGTERM (then killed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, checkpoint, overrides: Sequence[str] = (), log: Path | None = None, start_timeout: float = 120,
                 env: dict | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else Path(os.devnull)
        out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "fluid.serve", f"checkpoint={checkpoint}",
                                      f"port={self.port}", "log_level=warning", *overrides],
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        out.close()
        deadline = time.time() + start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start within {start_timeout} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as {name: value} (series without labels)."""
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
