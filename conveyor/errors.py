"""The errors a user can fix, shared by every layer (a leaf: imports nothing of ours)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: names the file and the field so the user can fix it."""

    def __init__(self, source: str, field: str | None, problem: str):
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: field '{field}'" if field else source
        super().__init__(f"{where}: {problem}")


class SpecError(ValueError):
    """A pipeline spec that cannot run: names the spec file, the field and, where there is one, the column."""

    def __init__(self, spec: str, field: str, problem: str):
        self.spec = spec
        self.field = field
        self.problem = problem
        super().__init__(f"{spec}: {field}: {problem}")
