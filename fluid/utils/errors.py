"""User-facing configuration errors: one line that names the key and the fix."""

from __future__ import annotations


class FluidConfigError(ValueError):
    """A bad config value or a missing file. ``fluid.train`` prints it as one line."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        msg = f"{key}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


def one_line_errors(fn):
    """For an entry point's main: a :class:`FluidConfigError` ends the process with its one line
    on stderr (``error: KEY: ...``) and exit status 2, instead of a traceback."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FluidConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
