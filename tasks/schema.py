"""Declared schemas of input tables (built from a pipeline spec's sources)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int", "float", "str", "timestamp"
    required: bool = True  # must be present in the file


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[Column, ...]
    na_values: tuple[str, ...] = ()  # spellings of "no value" beyond the usual ones

    @classmethod
    def of(cls, name: str, columns: dict[str, str], na_values: list[str] | None = None) -> TableSchema:
        return cls(name, tuple(Column(c, k) for c, k in columns.items()), tuple(na_values or ()))

    def kind(self, name: str) -> str:
        return next(c.kind for c in self.columns if c.name == name)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]
