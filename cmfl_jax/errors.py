"""The one error type the project raises for bad input.

The CLI catches it and prints its message as one line on stderr with exit
status 2, so every message must name the file (or config key) and the problem.
"""

from __future__ import annotations

import os


class CMFLError(Exception):
    """Bad input: a file, a folder, a config value or a checkpoint that cannot be used."""

    def __init__(self, where: str | os.PathLike | None, problem: str):
        self.where = None if where is None else os.fspath(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)
