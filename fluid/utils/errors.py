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
