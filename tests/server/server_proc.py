"""Run ``halserve serve`` as a subprocess on a free port and wait until it says it is ready."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
MODEL_NAME = "tiny"
READY = re.compile(r"ready on (http://\S+?:\d+)")


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1")
        env.pop("HALSERVE_API_KEY", None)
        self.log_path = log_path
        self._log = open(log_path, "w")
        # Output goes to a file, never a pipe: a pipe nobody drains blocks the server.
        self.proc = subprocess.Popen([sys.executable, "-m", "halserve.cli", "serve", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.url = self._wait_ready(timeout=180)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY.search(self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
