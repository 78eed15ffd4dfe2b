"""Pipeline specs: a team's own tables, label, features and rules, declared in a YAML file.

A spec is data, not code (pydantic, ``extra="forbid"``). Only ingest and clean
read it; every later stage reads features, label, task, time key and category
levels from the silver manifest (:class:`SilverSchema`). ``load_spec`` checks a
spec against itself before anything is computed: every problem is one
:class:`~conveyor.errors.SpecError` naming the file, the field and the column.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from conveyor.errors import SpecError

Task = Literal["binary", "multiclass", "regression"]
Kind = Literal["int", "float", "str", "timestamp", "bool"]


def _shipped_folder() -> Path:
    """pipelines/ (installed as conveyor.pipelines, package data): the specs Conveyor ships."""
    found = importlib.util.find_spec("conveyor.pipelines")
    return (
        Path(found.origin).parent
        if found and found.origin
        else Path(__file__).resolve().parent.parent / "pipelines"
    )


SHIPPED = _shipped_folder()
FOLD = "_fold"  # ratio splits: clean writes a row hash in [0, 1) here; train/evaluate slice on it


# --- the split: the contract every stage after clean reads -----------------------------------


@dataclass(frozen=True)
class SplitParams:
    """Which silver rows train, validate (early stopping, threshold) and test (the holdout).

    ``time``: train on ``time_key < train_end``, validate up to ``valid_end``,
    hold out the rest. ``ratio``: by the row's ``_fold`` value (a hash in
    [0, 1) written by clean): train below ``train``, validate below
    ``train + valid``, hold out the rest.
    """

    kind: Literal["time", "ratio"] = "time"
    train_end: str = "2013-09-01"
    valid_end: str = "2013-10-01"
    train: float = 0.7
    valid: float = 0.15
    time_key: str = "sched_dep"


@dataclass(frozen=True)
class SilverSchema:
    """What clean commits in the silver manifest's ``extra``: all a later stage may know of the spec."""

    spec: str  # the spec's name
    spec_version: str  # content hash of the spec
    features: list[str]
    categorical: list[str]
    categories: dict[str, list[str]]  # levels of each categorical feature, in code order
    label: str
    task: Task
    classes: list[str]  # multiclass: the label's codes 0..k-1 name these; binary: [negative, positive]
    time_key: str
    split: dict[str, Any]  # SplitParams as a dict
    baseline_keys: list[str]
    gate_metric: str
    raw_fields: dict[str, str] = field(default_factory=dict)  # main-table columns a row needs (inference)
    keys: list[str] = field(default_factory=list)  # row keys carried next to the features (never features)

    def to_extra(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> SilverSchema:
        known = {k: extra[k] for k in cls.__dataclass_fields__ if k in extra}
        return cls(**known)

    def split_params(self) -> SplitParams:
        return SplitParams(**self.split)


# --- expressions: a small allow-listed vocabulary over columns -------------------------------


# Functions a spec may call in a derived column, a label or an ``expression`` rule: vectorised
# over pandas Series. Anything else (attributes, subscripts, lambdas, imports) is refused.
def _as_date(year: Any, month: Any, day: Any) -> pd.Series:
    parts = pd.DataFrame({"year": year, "month": month, "day": day}).astype("float64")
    return pd.to_datetime(parts.astype("Int64"), errors="coerce")


def _dt(value: Any) -> Any:
    return value.dt if hasattr(value, "dt") else pd.Series(value).dt


FUNCTIONS: dict[str, Any] = {
    "date": _as_date,
    "day_of_week": lambda d: _dt(d).day_of_week,
    "day_of_year": lambda d: _dt(d).day_of_year,
    "month_of": lambda d: _dt(d).month,
    "year_of": lambda d: _dt(d).year,
    "hour_of": lambda d: _dt(d).hour,
    "hhmm_to_minutes": lambda v: (v // 100) * 60 + v % 100,
    "log1p": np.log1p,
    "log": np.log,
    "sqrt": np.sqrt,
    "abs": np.abs,
    "where": lambda c, a, b: pd.Series(np.where(c, a, b), index=c.index if hasattr(c, "index") else None),
    "isnull": pd.isna,
    "notnull": pd.notna,
    "between": lambda v, lo, hi: (v >= lo) & (v <= hi),
    "fullmatch": lambda v, pattern: v.astype("string").str.fullmatch(pattern),
    "hours": lambda n: pd.Timedelta(hours=n),
    "days": lambda n: pd.Timedelta(days=n),
}
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
    ast.BitAnd: lambda a, b: a & b,
    ast.BitOr: lambda a, b: a | b,
}
_CMPOPS = {
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}


class Expression:
    """A parsed expression: the columns it reads, and its value over a frame."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.tree = ast.parse(text, mode="eval").body
        except SyntaxError as exc:
            raise ValueError(f"cannot parse expression {text!r} ({exc.msg})") from None
        self.columns: list[str] = []
        self._check(self.tree)

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            if node.id not in self.columns:
                self.columns.append(node.id)
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, int | float | str | bool | None):
                raise ValueError(f"{self.text!r}: constant {node.value!r} is not allowed")
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Invert | ast.Not):
            self._check(node.operand)
        elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            for part in (node.left, *node.comparators):
                self._check(part)
        elif isinstance(node, ast.BoolOp):
            for part in node.values:
                self._check(part)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in FUNCTIONS:
                allowed = ", ".join(sorted(FUNCTIONS))
                raise ValueError(
                    f"{self.text!r}: function {node.func.id!r} is not allowed (allowed: {allowed})"
                )
            for arg in node.args:
                self._check(arg)
        else:
            raise ValueError(f"{self.text!r}: {type(node).__name__} is not allowed in an expression")

    def evaluate(self, frame: pd.DataFrame) -> Any:
        return self._eval(self.tree, frame)

    def _eval(self, node: ast.AST, frame: pd.DataFrame) -> Any:
        if isinstance(node, ast.Name):
            return frame[node.id]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](self._eval(node.left, frame), self._eval(node.right, frame))
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, frame)
            return -value if isinstance(node.op, ast.USub) else ~value
        if isinstance(node, ast.Compare):
            left, out = self._eval(node.left, frame), None
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self._eval(right_node, frame)
                part = _CMPOPS[type(op)](left, right)
                out = part if out is None else out & part
                left = right
            return out
        if isinstance(node, ast.BoolOp):
            values = [self._eval(v, frame) for v in node.values]
            out = values[0]
            for v in values[1:]:
                out = (out & v) if isinstance(node.op, ast.And) else (out | v)
            return out
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return FUNCTIONS[node.func.id](*(self._eval(a, frame) for a in node.args))


# --- the spec ---------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Model):
    """One input table: where it is and what its columns are."""

    url: str = Field(description="fsspec URL, or package://<package>/<path> for a file shipped in a package")
    format: Literal["auto", "csv", "parquet"] = "auto"
    columns: dict[str, Kind] = Field(description="declared column types; only these columns are read")
    na_values: list[str] = Field(default_factory=list, description="extra spellings of 'no value'")
    encoding: str = Field("utf-8", description="text encoding of a CSV source (a Python codec name)")

    @model_validator(mode="after")
    def _known_encoding(self) -> SourceSpec:
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r} (use a Python codec name)") from None
        return self


class JoinSpec(_Model):
    """A lookup join onto the main table: exact on keys, or as-of (backward only) on a time key."""

    table: str
    by: dict[str, str] = Field(description="main-table column -> lookup-table column (exact keys)")
    how: Literal["exact", "asof"] = "exact"
    asof: dict[str, str] | None = Field(None, description="as-of: main time column -> lookup time column")
    tolerance: str | None = Field(None, description="as-of: how far back a match may lie, e.g. '2h'")
    columns: dict[str, str] = Field(description="lookup column -> name it gets on the main table")
    duplicates: Literal["first", "last", "error"] = "first"
    missing: Literal["null", "quarantine"] = "null"


RuleCheck = Literal[
    "not_null", "in_range", "isin", "notin", "str_matches", "str_length", "greater_than",
    "greater_than_or_equal_to", "less_than", "less_than_or_equal_to", "equal_to", "not_equal_to",
    "in_table", "expression", "unique",
]  # fmt: skip


class RuleSpec(_Model):
    """A validation rule (pandera's check vocabulary); a row breaking it is quarantined with ``reason``."""

    column: str | None = None
    check: RuleCheck
    min_value: float | None = None
    max_value: float | None = None
    value: Any = None
    values: list[Any] | None = None
    pattern: str | None = None
    table: str | None = None  # in_table: the lookup table
    table_column: str | None = None  # in_table: its column
    expression: str | None = None  # expression: rows where it is False break the rule
    reason: str | None = None
    label_rule: bool | None = Field(
        None, description="skipped when scoring unlabelled rows; default: reads the label"
    )

    def describe(self) -> str:
        if self.reason:
            return self.reason
        c = self.column
        return {
            "not_null": f"{c} is missing",
            "in_range": f"{c} outside {_num(self.min_value)}..{_num(self.max_value)}",
            "isin": f"{c} not in {self.values}",
            "notin": f"{c} in {self.values}",
            "str_matches": f"{c} does not match {self.pattern}",
            "str_length": f"{c} length outside {_num(self.min_value)}..{_num(self.max_value)}",
            "greater_than": f"{c} <= {self.value}",
            "greater_than_or_equal_to": f"{c} < {self.value}",
            "less_than": f"{c} >= {self.value}",
            "less_than_or_equal_to": f"{c} > {self.value}",
            "equal_to": f"{c} != {self.value}",
            "not_equal_to": f"{c} == {self.value}",
            "in_table": f"{c} not in the {self.table} table",
            "expression": f"{self.expression} is false",
            "unique": f"{c} is not unique",
        }[self.check]


def _num(v: float | None) -> str:
    return "" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


class LabelSpec(_Model):
    name: str = Field(description="the label column in the silver data")
    column: str | None = Field(None, description="a main-table column as the label")
    expression: str | None = Field(None, description="or an expression over columns")
    task: Task
    positive_class: str | None = None
    classes: list[str] | None = Field(None, description="multiclass: the class names, in code order")

    @model_validator(mode="after")
    def _one_source(self) -> LabelSpec:
        if (self.column is None) == (self.expression is None):
            raise ValueError("give exactly one of column or expression")
        return self


class CategoricalSpec(_Model):
    name: str
    levels_from: str | None = Field(None, description="also take levels from a lookup column, 'table.column'")


class FeatureSpec(_Model):
    include: list[str]
    categorical: list[str | CategoricalSpec] = Field(default_factory=list)
    forbidden: list[str] = Field(default_factory=list, description="may feed the label, never a feature")

    def categorical_specs(self) -> list[CategoricalSpec]:
        return [c if isinstance(c, CategoricalSpec) else CategoricalSpec(name=c) for c in self.categorical]


class SplitSpec(_Model):
    kind: Literal["time", "ratio"] = "time"
    train_end: str | None = None
    valid_end: str | None = None
    train: float = Field(0.7, gt=0, lt=1)
    valid: float = Field(0.15, gt=0, lt=1)
    seed: int = 13


class HookSpec(_Model):
    """Escape hatch: ``module:function`` taking and returning a pandas frame (after derived columns)."""

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    adds: list[str] = Field(default_factory=list, description="columns the hook adds")


class PipelineSpec(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    description: str = ""
    model: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="registry name of the model")
    sources: dict[str, SourceSpec]
    main: str
    time: str = Field(description="the time column (after derivation) the split and as-of joins use")
    row_keys: list[str] = Field(
        default_factory=list,
        description="main-table columns that identify a row: "
        "carried into silver and predictions (never features)",
    )
    prepare: dict[str, str] = Field(default_factory=dict, description="columns derived before the joins")
    joins: list[JoinSpec] = Field(default_factory=list)
    derived: dict[str, str] = Field(default_factory=dict, description="columns derived after the joins")
    hooks: list[HookSpec] = Field(default_factory=list)
    label: LabelSpec
    features: FeatureSpec
    required: list[str] = Field(default_factory=list, description="main-table columns that may not be null")
    rules: list[RuleSpec] = Field(default_factory=list)
    duplicates: Literal["quarantine", "keep"] = "quarantine"
    split: SplitSpec = Field(default_factory=SplitSpec)
    baseline: list[str] = Field(default_factory=list, description="group keys of the naive baseline")
    gate_metric: str | None = None


@dataclass(frozen=True)
class LoadedSpec:
    """A checked spec, where it came from, and its content hash."""

    spec: PipelineSpec
    where: str
    version: str

    @property
    def label_columns(self) -> list[str]:
        label = self.spec.label
        return [label.column] if label.column else Expression(label.expression or "").columns


GATE_METRICS = {
    "binary": ("roc_auc", "f1", "accuracy", "log_loss", "brier"),
    "multiclass": ("accuracy", "macro_f1", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}
DEFAULT_GATE = {"binary": "roc_auc", "multiclass": "macro_f1", "regression": "rmse"}


def shipped_specs() -> dict[str, Path]:
    """The specs shipped with Conveyor, by name (``pipelines/*.yaml``)."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def resolve_url(url: str) -> str:
    """``package://pkg/path`` -> the file inside the installed package; other URLs unchanged."""
    if not url.startswith("package://"):
        return url
    package, _, rest = url.removeprefix("package://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {package!r} is not installed (needed for {url})")
    return (Path(spec.origin).parent / rest).as_uri()


def load_spec(ref: str) -> LoadedSpec:
    """Read and check a spec: a shipped name (``flights``), a local path or an fsspec URL."""
    import fsspec
    import yaml

    shipped = shipped_specs()
    where = str(shipped[ref]) if ref in shipped else ref
    try:
        with fsspec.open(where, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, ValueError) as exc:
        names = ", ".join(shipped)
        raise SpecError(
            ref, "file", f"cannot read it ({type(exc).__name__}); shipped specs: {names}"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(where, "file", f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpecError(where, "file", "expected a mapping at the top level")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SpecError(where, ".".join(map(str, err["loc"])) or "file", err["msg"]) from None
    version = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[
        :12
    ]
    loaded = LoadedSpec(spec, where, version)
    check_spec(loaded)
    return loaded


def label_sources_of(s: PipelineSpec) -> set[str]:
    label = s.label
    if label.column:
        return {label.column}
    try:
        return set(Expression(label.expression or "").columns)
    except ValueError:
        return set()


def check_spec(loaded: LoadedSpec) -> None:
    """Every reference in the spec resolves; a forbidden column never reaches a feature. No data is read."""
    s, where = loaded.spec, loaded.where

    def fail(field_: str, problem: str) -> None:
        raise SpecError(where, field_, problem)

    if s.main not in s.sources:
        fail("main", f"'{s.main}' is not one of the sources ({', '.join(s.sources)})")
    for alias, src in s.sources.items():
        if not src.columns:
            fail(f"sources.{alias}.columns", "declare at least one column")
    main_cols = set(s.sources[s.main].columns)
    known = set(main_cols)
    lineage: dict[str, set[str]] = {c: {c} for c in main_cols}  # column -> main/lookup columns it comes from

    def expr(field_: str, text: str) -> Expression:
        try:
            e = Expression(text)
        except ValueError as exc:
            fail(field_, str(exc))
        for col in e.columns:
            if col not in known:
                fail(
                    field_, f"column '{col}' does not exist at this point (known: {', '.join(sorted(known))})"
                )
        return e

    for name, text in s.prepare.items():
        e = expr(f"prepare.{name}", text)
        lineage[name] = set().union(*(lineage[c] for c in e.columns)) if e.columns else set()
        known.add(name)
    for i, join in enumerate(s.joins):
        at = f"joins[{i}]"
        if join.table not in s.sources:
            fail(f"{at}.table", f"'{join.table}' is not one of the sources")
        right = set(s.sources[join.table].columns)
        pairs = dict(join.by) | (join.asof or {})
        for left_col, right_col in pairs.items():
            if left_col not in known:
                fail(f"{at}.by", f"join key '{left_col}' is absent from the main table '{s.main}'")
            if right_col not in right:
                fail(f"{at}.by", f"join key '{right_col}' is absent from the table '{join.table}'")
        if join.how == "asof" and not join.asof:
            fail(f"{at}.asof", "an as-of join needs asof: {main time column: lookup time column}")
        if join.how == "asof" and join.tolerance:
            try:
                pd.Timedelta(join.tolerance)
            except ValueError:
                fail(f"{at}.tolerance", f"'{join.tolerance}' is not a duration like '2h'")
        for col, new in join.columns.items():
            if col not in right:
                fail(f"{at}.columns", f"column '{col}' is absent from the table '{join.table}'")
            if new in known:
                fail(f"{at}.columns", f"'{new}' would overwrite an existing column; rename it")
            lineage[new] = {f"{join.table}.{col}"}
            known.add(new)
    for name, text in s.derived.items():
        e = expr(f"derived.{name}", text)
        lineage[name] = set().union(*(lineage[c] for c in e.columns)) if e.columns else set()
        known.add(name)
    for i, hook in enumerate(s.hooks):
        for col in hook.adds:
            lineage[col] = set()
            known.add(col)
        if not hook.function:
            fail(f"hooks[{i}].function", "give module:function")
    for key in s.row_keys:
        if key not in main_cols:
            fail("row_keys", f"column '{key}' is absent from the main table '{s.main}'")
        if key in set(s.features.forbidden) or key in label_sources_of(s):
            fail(
                "row_keys",
                f"column '{key}' feeds the label or is forbidden; a key must be known at prediction time",
            )
    if s.time not in known:
        fail("time", f"column '{s.time}' does not exist (known: {', '.join(sorted(known))})")

    label = s.label
    if label.column is not None and label.column not in known:
        fail("label.column", f"column '{label.column}' does not exist")
    label_sources = {label.column} if label.column else set()
    if label.expression is not None:
        label_sources = set(expr("label.expression", label.expression).columns)
    forbidden = set(s.features.forbidden)
    for col in forbidden:
        if col not in known:
            fail("features.forbidden", f"column '{col}' does not exist")
    leaky = forbidden | label_sources | {label.name}
    for col in s.features.include:
        if col not in known:
            fail("features.include", f"column '{col}' does not exist (known: {', '.join(sorted(known))})")
        if col in leaky:
            fail(
                "features.include",
                f"column '{col}' is forbidden as a feature (it feeds the label or is leaky)",
            )
        via = lineage.get(col, set()) & leaky
        if via:
            fail("features.include", f"feature '{col}' is computed from forbidden column '{sorted(via)[0]}'")
    if label.name in known and label.column != label.name:
        fail("label.name", f"'{label.name}' already names a column; choose another label name")
    for cat in s.features.categorical_specs():
        if cat.name not in s.features.include:
            fail("features.categorical", f"'{cat.name}' is not in features.include")
        if cat.levels_from:
            table, _, col = cat.levels_from.partition(".")
            if table not in s.sources or col not in s.sources[table].columns:
                fail(
                    "features.categorical",
                    f"levels_from '{cat.levels_from}' is not a table.column of the sources",
                )
    if label.task == "multiclass" and label.classes is not None and len(label.classes) < 2:
        fail("label.classes", "a multiclass label needs at least two classes")
    for col in s.required:
        if col not in main_cols:
            fail("required", f"column '{col}' is absent from the main table '{s.main}'")
    for i, rule in enumerate(s.rules):
        at = f"rules[{i}]"
        if rule.check == "expression":
            if not rule.expression:
                fail(f"{at}.expression", "an expression rule needs an expression")
            expr(f"{at}.expression", rule.expression)
            continue
        if rule.column is None or rule.column not in known:
            fail(f"{at}.column", f"column '{rule.column}' does not exist")
        in_table = rule.check == "in_table"
        if in_table and (
            rule.table not in s.sources or rule.table_column not in s.sources[rule.table].columns
        ):
            fail(f"{at}.table", f"'{rule.table}.{rule.table_column}' is not a table.column of the sources")
        if rule.check in ("isin", "notin") and not rule.values:
            fail(f"{at}.values", f"{rule.check} needs a list of values")
        if rule.check == "str_matches":
            try:
                re.compile(rule.pattern or "")
            except re.error as exc:
                fail(f"{at}.pattern", f"not a regular expression ({exc})")
    split = s.split
    if split.kind == "time":
        if not split.train_end or not split.valid_end:
            fail("split", "a time split needs train_end and valid_end")
        try:
            t, v = pd.Timestamp(split.train_end), pd.Timestamp(split.valid_end)
        except ValueError as exc:
            fail("split", f"not an ISO date ({exc})")
        if not t < v:
            fail(
                "split.valid_end",
                f"{split.valid_end} must be after train_end {split.train_end}: "
                "the validation slice would be empty",
            )
    elif split.train + split.valid >= 1:
        fail("split", f"train {split.train} + valid {split.valid} leaves no holdout")
    for key in s.baseline:
        if key not in s.features.include:
            fail("baseline", f"group key '{key}' is not a feature")
    if s.gate_metric is not None and s.gate_metric not in GATE_METRICS[label.task]:
        fail(
            "gate_metric",
            f"'{s.gate_metric}' is not a {label.task} metric ({', '.join(GATE_METRICS[label.task])})",
        )


def split_params(loaded: LoadedSpec, train_end: str = "", valid_end: str = "") -> SplitParams:
    """The spec's split, with run-time overrides of the time cut-offs."""
    s = loaded.spec.split
    if s.kind == "ratio":
        return SplitParams(kind="ratio", train=s.train, valid=s.valid, time_key=loaded.spec.time)
    t, v = train_end or s.train_end or "", valid_end or s.valid_end or ""
    if not pd.Timestamp(t) < pd.Timestamp(v):
        raise SpecError(loaded.where, "split", f"valid_end {v} must be after train_end {t}")
    return SplitParams(kind="time", train_end=t, valid_end=v, time_key=loaded.spec.time)


# --- a starting spec from a file ---------------------------------------------------------------

_LABEL_HINTS = ("label", "target", "y", "class", "outcome", "churn", "is_")
_TIME_HINTS = ("date", "time", "timestamp", "datetime", "created", "day", "ts")


def _infer_kind(values: pd.Series) -> str:
    text = values.dropna().astype(str).str.strip()
    text = text[text != ""]
    if text.empty:
        return "str"
    if pd.to_numeric(text, errors="coerce").notna().mean() > 0.98:
        numbers = pd.to_numeric(text, errors="coerce").dropna()
        return (
            "int"
            if (numbers == np.floor(numbers)).all() and not text.str.contains(r"[.eE]").any()
            else "float"
        )
    parsed = pd.to_datetime(text, errors="coerce", format="ISO8601", utc=True)
    return "timestamp" if parsed.notna().mean() > 0.98 else "str"


def draft_spec(
    url: str, name: str | None = None, label: str | None = None, rows: int = 5000
) -> tuple[str, str]:
    """A commented spec YAML for the table at ``url`` (types inferred from its first rows) and its name."""
    import fsspec

    base = url.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    name = name or re.sub(r"[^a-z0-9_]", "_", base.lower()).strip("_") or "my_pipeline"
    if not re.match(r"^[a-z]", name):
        name = f"p_{name}"
    with fsspec.open(url, "rb", compression="infer") as fh:
        is_parquet = url.endswith(".parquet")
        frame = (
            pd.read_parquet(fh)
            if is_parquet
            else pd.read_csv(fh, dtype=str, nrows=rows, keep_default_na=False)
        )
    kinds = {c: _infer_kind(frame[c]) for c in frame.columns}
    label = label or next((c for c in frame.columns if c.lower().startswith(_LABEL_HINTS)), None)
    time_col = next((c for c, k in kinds.items() if k == "timestamp"), None) or next(
        (c for c in frame.columns if c.lower() in _TIME_HINTS), None
    )
    task = "regression"
    if label is not None:
        distinct = frame[label].nunique()
        task = (
            "binary"
            if distinct == 2
            else ("multiclass" if kinds[label] == "str" or distinct <= 20 else "regression")
        )
    ids = {c for c in frame.columns if c.lower() == "id" or c.lower().endswith("_id")}
    features = [c for c in frame.columns if c not in {label, time_col, *ids}]
    categorical = [c for c in features if kinds[c] == "str"]
    lines = [
        f"# Drafted by `conveyor init` from {url} (types inferred from the first {len(frame)} rows).",
        "# Review every TODO, then: conveyor check-spec THIS_FILE && conveyor run --spec THIS_FILE",
        f"name: {name}",
        f"model: {name}_model",
        "sources:",
        f"  {name}:",
        f"    url: {url}",
        "    columns:                 # declared types: int, float, str, timestamp, bool",
        *[f"      {c}: {k}" for c, k in kinds.items()],
        f"main: {name}",
    ]
    if time_col and kinds.get(time_col) == "timestamp":
        lines += [f"time: {time_col}              # the split and as-of joins use it"]
        when = pd.to_datetime(frame[time_col], errors="coerce", utc=True).dropna().sort_values()
        cut = (
            [when.iloc[int(len(when) * q)].date().isoformat() for q in (0.7, 0.85)]
            if len(when) > 2
            else ["", ""]
        )
        split = [
            f"split: {{kind: time, train_end: '{cut[0]}', valid_end: '{cut[1]}'}}"
            "   # about 70% train, 15% validation by time; adjust"
        ]
    else:
        lines += [
            "time: row_time              # TODO: no timestamp column found; a ratio split is used",
            "prepare:",
            "  row_time: date(2000, 1, 1)",
        ]
        split = ["split: {kind: ratio, train: 0.7, valid: 0.15, seed: 13}"]
    lines += [
        "label:",
        f"  name: {(label or 'TODO_label')}_target",
        f"  column: {label or 'TODO_label_column'}" + ("" if label else "   # TODO: the column to predict"),
        f"  task: {task}                # binary | multiclass | regression",
        "features:",
        f"  include: [{', '.join(features)}]",
        f"  categorical: [{', '.join(categorical)}]",
        "  forbidden: []            # TODO: columns only known after the outcome (they leak the label)",
        f"required: [{', '.join(c for c in features[:3])}]   # TODO: columns that may never be null",
        "rules: []                  # e.g. {column: age, check: in_range, min_value: 0, max_value: 120}",
        *split,
        "baseline: []               # group keys of the naive baseline (features), e.g. [region]",
    ]
    return "\n".join(lines) + "\n", name
