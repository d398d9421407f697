"""User-facing errors in one line that names the key and the fix: bad input (exit 2) and failed runs (exit 3)."""

from __future__ import annotations


class FluidError(ValueError):
    """A failure a user can act on, told in one line: ``KEY: problem (fix)``. Entry points end
    with ``<kind>: <line>`` on stderr and the kind's exit status (:func:`one_line_errors`)."""

    exit_code = 1
    kind = "error"

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        msg = f"{key}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class FluidConfigError(FluidError):
    """Bad input: a config value, a missing or unreadable file, bad data. Nothing ran, or it
    stopped before producing anything. ``error: KEY: ...``, exit status 2."""

    exit_code = 2
    kind = "error"


class FluidRunError(FluidError):
    """A run that started with valid input failed: a non-finite loss or weights, a failed child
    process. What it measured so far is kept, nothing is published. ``failed: KEY: ...``, exit 3."""

    exit_code = 3
    kind = "failed"


def one_line_errors(fn):
    """For an entry point's main: a :class:`FluidError` ends the process with its one line on
    stderr (``error: KEY: ...`` exit 2 for a config error, ``failed: KEY: ...`` exit 3 for a
    failed run) instead of a traceback."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FluidError as e:
            print(f"{e.kind}: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    return wrapper
