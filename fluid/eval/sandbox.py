"""Run untrusted, model-generated Python programs in a separate, resource-limited interpreter.

Threat model. The programs come from a language model, not from an adversary: the risk is code that
hangs (``while True``), allocates without bound, prints forever, writes files, changes directory, kills
its interpreter or exits early. Isolation is by *process*, *resource limits* and a *throw-away working
directory*:

* every program runs in a fresh ``sys.executable -I`` (isolated mode: no user site, no ``PYTHON*``
  variables, no script directory on ``sys.path``), never in the calling process;
* its own session / process group (``start_new_session=True``), so a wall-clock timeout kills it and
  every child it started (``os.killpg(..., SIGKILL)``); stray children are killed after a normal exit too;
* rlimits set in the child before ``exec``: address space (``memory_mb``), CPU seconds (a little above the
  timeout), file size (16 MiB, which also bounds what it can print), no core dumps;
* cwd, ``HOME`` and ``TMPDIR`` are a fresh ``tempfile.TemporaryDirectory()`` deleted afterwards; the
  environment holds only ``PATH`` and a few neutral variables (no ``PYTHONPATH``, one OpenMP thread);
* stdin is ``/dev/null``; stdout and stderr go to files in that directory and only their tails are read.

A program counts as "passed" only if it exits with status 0 *and* reached its very end: a random
sentinel, appended to the program, must appear on its stdout. ``sys.exit(0)`` or ``os._exit(0)`` before
the tests ran is therefore a failure.

This is not a security boundary against a hostile user: the program runs as the same user with the
same file-system permissions (it can read the evaluator's files, open sockets, or detach with
``setsid``; it could even read the sentinel from its own source). It does guarantee that ordinary
generated code cannot hang the evaluator, exhaust its memory, or write into its working directory.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

PASSED, FAILED, TIMEOUT, MEMORY = "passed", "failed", "timeout", "memory"
FSIZE_MB = 16           # largest file (stdout / stderr included) the program may write
TAIL_BYTES = 64 * 1024  # how much of stdout / stderr is read back
DETAIL_CHARS = 300

_MEMORY_RE = re.compile(r"^(?:\w+\.)*MemoryError\b|Cannot allocate memory|std::bad_alloc|out of memory", re.M)


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "memory"
    detail: str  # short reason: the last line of stderr, the signal, ...
    seconds: float


def _limits(timeout_s: float, memory_mb: int):
    """The ``preexec_fn``: runs in the child between fork and exec. It only calls ``setrlimit`` (no imports,
    no locks, no allocation-heavy work), which keeps it safe when ``run_program`` runs in several threads."""
    mem = int(memory_mb) * 1024 * 1024
    cpu = int(math.ceil(timeout_s)) + 1
    fsize = FSIZE_MB * 1024 * 1024
    setrlimit = resource.setrlimit

    def preexec():
        setrlimit(resource.RLIMIT_AS, (mem, mem))
        setrlimit(resource.RLIMIT_CORE, (0, 0))
        setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    return preexec


def _tail(path: str, n: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 3] + "..."


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _kill(proc: subprocess.Popen, group: bool) -> None:
    if group:
        _killpg(proc.pid)
    else:  # pragma: no cover - not POSIX
        proc.kill()


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` (Python source) in a fresh, limited interpreter; see the module docstring.

    ``timeout_s`` is a wall-clock limit (the process group is killed when it runs out), ``memory_mb`` the
    address-space limit. Thread-safe: every call has its own directory, files and process group."""
    token = "FLUID-SANDBOX-END-" + secrets.token_hex(16)
    epilogue = (
        "\n\nimport os as _fluid_os, sys as _fluid_sys\n"
        "try:\n    _fluid_sys.stdout.flush()\nexcept Exception:\n    pass\n"
        f"_fluid_os.write(1, b'\\n{token}\\n')\n"
    )
    with tempfile.TemporaryDirectory(prefix="fluid-sandbox-") as tmp:
        prog_path = os.path.join(tmp, "program.py")
        out_path, err_path = os.path.join(tmp, "stdout.txt"), os.path.join(tmp, "stderr.txt")
        with open(prog_path, "w", encoding="utf-8") as f:
            f.write(program)
            f.write(epilogue)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        kwargs = {}
        if os.name == "posix" and resource is not None:
            kwargs = dict(start_new_session=True, preexec_fn=_limits(timeout_s, memory_mb))
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", prog_path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, close_fds=True, **kwargs)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc, bool(kwargs))
            proc.wait()
        finally:
            if proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt): never leave it running
                _kill(proc, bool(kwargs))
                proc.wait()
        seconds = time.monotonic() - start
        if kwargs:
            _killpg(proc.pid)  # children it left behind in its process group
        stdout, stderr = _tail(out_path), _tail(err_path)

    rc = proc.returncode
    last = _last_line(stderr)
    if timed_out:
        return ExecResult(TIMEOUT, f"killed after the {timeout_s:g} s wall-clock limit", seconds)
    if rc == 0:
        if token in stdout:
            return ExecResult(PASSED, "", seconds)
        return ExecResult(FAILED, "exited with status 0 before the end of the program (no sentinel)", seconds)
    if _MEMORY_RE.search(stderr):
        return ExecResult(MEMORY, last or "MemoryError", seconds)
    if rc < 0:
        sig = -rc
        if sig == getattr(signal, "SIGXCPU", None):
            return ExecResult(TIMEOUT, f"CPU time limit exceeded ({_signal_name(sig)})", seconds)
        if sig == signal.SIGKILL:  # not ours (we did not time it out): the kernel's OOM killer
            return ExecResult(MEMORY, "killed by SIGKILL (out of memory?)", seconds)
        if sig == getattr(signal, "SIGXFSZ", None):
            return ExecResult(FAILED, f"file / output size limit of {FSIZE_MB} MiB exceeded (SIGXFSZ)", seconds)
        return ExecResult(FAILED, f"killed by {_signal_name(sig)}" + (f": {last}" if last else ""), seconds)
    return ExecResult(FAILED, last or f"exit status {rc}", seconds)


def run_many(programs: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
             workers: int | None = None) -> list[ExecResult]:
    """:func:`run_program` over ``programs`` with a thread pool (default ``os.cpu_count()`` workers);
    the results are in input order."""
    if not programs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout_s=timeout_s, memory_mb=memory_mb), programs))
