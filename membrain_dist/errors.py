"""The one exception type for bad user input (files, manifests, STAR tables)."""

from __future__ import annotations

import os

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input: names the offending file and what is wrong with it.

    Parameters
    ----------
    path
        The file (or folder) at fault.
    problem
        Human-readable description of the problem.

    ``str(error) == f"{path}: {problem}"``.
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        # keep the two-argument constructor picklable (dask / Prefect ship exceptions)
        return (type(self), (self.path, self.problem))
