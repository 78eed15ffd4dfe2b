"""Flow parameters: one pydantic model, so defaults live in one place and Prefect renders it as the run
form."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
)

from conveyor import operator
from conveyor.settings import DEFAULT_MODEL, DEFAULT_SPEC, DEFAULT_STORAGE, MODEL_NAME_PATTERN
from conveyor.tasks.deploy import DEFAULT_GUARDS, GateParams
from conveyor.tasks.families import FAMILIES, ForestParams, LinearParams
from conveyor.tasks.ingest import IngestParams
from conveyor.tasks.monitor import Thresholds
from conveyor.tasks.search import SearchParams
from conveyor.tasks.spec import GATE_METRICS, LoadedSpec, SplitParams, load_spec, shipped_specs
from conveyor.tasks.spec import split_params as spec_split
from conveyor.tasks.train import TrainParams


def _check_cluster(value: str) -> str:
    """auto/cpu/gpu, or a scheduler the operator listed (conveyor.operator): a form cannot pick its own."""
    return operator.confine_cluster(value)


def _storage(value: str) -> str:
    return operator.confine_url(value, "storage")


# Parameter types whose values are confined by the operator's settings (the environment of the
# process that validates them: the worker or the CLI), whoever fills the form or sends the event.
StorageURL = Annotated[str, AfterValidator(_storage)]


def _titled_choices(*titles: str) -> Callable[[dict[str, Any]], None]:
    """Name the alternatives of an ``A | B`` field: the run form labels its switch with these, not "str"."""

    def extra(schema: dict[str, Any]) -> None:
        for choice, title in zip(schema["anyOf"], titles, strict=True):
            choice["title"] = title

    return extra


# The run form offers the shipped specs and accepts a path or URL of one's own.
SpecChoice = Annotated[
    Literal[tuple(shipped_specs())] | str,  # type: ignore[valid-type]
    Field(json_schema_extra=_titled_choices("Shipped spec", "Path or URL")),
]

# The run form offers auto/cpu/gpu and accepts a scheduler address; every flow's params use this one type.
ClusterChoice = Annotated[
    Literal["auto", "cpu", "gpu"] | str,
    AfterValidator(_check_cluster),
    Field(json_schema_extra=_titled_choices("Local cluster", "Scheduler address")),
]


# Optional values, as a person fills them in: the run form shows a plain input holding 0 or "" (the blank,
# which each description explains: all rows, auto, the default), and the flow reads None. Prefect's form
# renders ``X | None`` as a type switch whose None side says only 'Property is type "None"'.
def _blank_is_none(blank: object) -> Callable[[object], object]:
    def read(value: object) -> object:
        if isinstance(value, str) and isinstance(blank, str):
            return None if not value.strip() else value
        if isinstance(value, int | float) and not isinstance(value, bool) and value == blank:
            return None
        return value

    return read


def _optional(kind: type, blank: object, schema: dict[str, Any]) -> Any:
    return Annotated[
        kind | None,
        BeforeValidator(_blank_is_none(blank)),
        PlainSerializer(lambda value: blank if value is None else value, when_used="json"),
        WithJsonSchema(schema),
    ]


OptionalCount = _optional(int, 0, {"type": "integer", "minimum": 0})
OptionalSeconds = _optional(float, 0, {"type": "number", "minimum": 0})
OptionalText = _optional(str, "", {"type": "string"})


def blank_field(blank: object, **kwargs: Any) -> Any:
    """A field of an ``Optional*`` type: None in Python, ``blank`` in the form and in JSON."""
    return Field(None, json_schema_extra={"default": blank}, **kwargs)


def storage_field(title: str = "Storage root URL") -> Any:
    return Field(
        DEFAULT_STORAGE,
        title=title,
        description="Where datasets, models and results are written and read: a folder, file://..., "
        "s3://bucket/prefix (credentials come from CONVEYOR_STORAGE_OPTIONS in the worker, never from here)",
    )


def model_field() -> Any:
    return Field(
        DEFAULT_MODEL,
        pattern=MODEL_NAME_PATTERN,
        title="Model name",
        description="Registry name: lowercase letters, digits and _",
    )


def cluster_field() -> Any:
    return Field(
        "auto",
        title="Dask cluster",
        description="A local cluster (auto: GPU workers if a GPU is visible, else CPU; cpu; gpu) "
        "or the address of a running Dask scheduler, e.g. tcp://scheduler:8786",
    )


def workers_field() -> Any:
    return blank_field(
        0,
        ge=1,
        title="Local Dask workers",
        description="Worker processes of a local cluster; 0 = automatic (one per 1-2 CPU cores, or one per "
        "GPU); ignored with a scheduler address",
    )


_RF = ForestParams()
_LIN = LinearParams()
ModelFamily = Literal["gbtree", "random_forest", "linear"]
assert set(ModelFamily.__args__) == set(FAMILIES)  # type: ignore[attr-defined]
# "spec": the gate metric the pipeline spec names (else its task's default).
GateMetric = Literal[("spec", *dict.fromkeys(m for names in GATE_METRICS.values() for m in names))]  # type: ignore[valid-type]


class ForestOptions(BaseModel):
    """Random forest (XGBoost, one round of parallel trees with row and column sampling)."""

    model_config = ConfigDict(extra="forbid", title="Random forest")

    n_trees: int = Field(
        _RF.n_trees, ge=1, le=2000, title="Trees", description="Trees grown side by side in the one round"
    )
    max_depth: int = Field(_RF.max_depth, ge=1, le=20, title="Max tree depth", description="Levels per tree")
    min_child_weight: float = Field(
        _RF.min_child_weight,
        ge=0,
        title="Min child weight",
        description="Smallest hessian sum a leaf may hold; larger = more conservative splits",
    )
    subsample: float = Field(
        _RF.subsample,
        gt=0,
        lt=1,
        title="Row sample per tree",
        description="Fraction of rows each tree sees (below 1, or the trees are alike)",
    )
    colsample_bynode: float = Field(
        _RF.colsample_bynode,
        gt=0,
        le=1,
        title="Column sample per split",
        description="Fraction of the features tried at each split",
    )
    max_cat_to_onehot: int = Field(
        _RF.max_cat_to_onehot,
        ge=1,
        title="One-hot categoricals up to",
        description="Categoricals with at most this many levels split one level at a time; more use "
        "partition splits",
    )


class LinearOptions(BaseModel):
    """Logistic regression on one-hot categoricals and standardised numerics (L-BFGS on the cluster)."""

    model_config = ConfigDict(extra="forbid", title="Linear model")

    l2: float = Field(
        _LIN.l2,
        ge=0,
        le=100,
        title="L2 penalty",
        description="Weight of the squared-weights penalty; 0 = none",
    )
    max_iter: int = Field(
        _LIN.max_iter, ge=1, le=10_000, title="Max L-BFGS iterations", description="Iterations at most"
    )
    tol: float = Field(
        _LIN.tol,
        gt=0,
        lt=1,
        title="Gradient tolerance",
        description="Stop when the gradient norm is below this",
    )
    early_stopping_rounds: int = Field(
        _LIN.early_stopping_rounds,
        ge=1,
        title="Early stopping iterations",
        description="Stop when the validation log loss has not improved for this many iterations",
    )


class TrainingOptions(BaseModel):
    """The model family and its settings (early stopping on the validation slice picks the rounds)."""

    model_config = ConfigDict(extra="forbid", title="Training")

    model: ModelFamily = Field(
        "gbtree",
        title="Model family",
        description="gbtree: gradient-boosted trees; random_forest: a forest of XGBoost trees; "
        "linear: logistic regression (its settings are below)",
    )
    num_boost_round: int = Field(
        TrainParams.num_boost_round,
        ge=1,
        le=20_000,
        title="Max boosting rounds",
        description="Trees at most (gbtree); early stopping usually ends sooner",
    )
    learning_rate: float = Field(
        TrainParams.learning_rate, gt=0, le=1, title="Learning rate", description="Shrinkage of each new tree"
    )
    max_depth: int = Field(
        TrainParams.max_depth, ge=1, le=16, title="Max tree depth", description="Levels per tree"
    )
    min_child_weight: float = Field(
        TrainParams.min_child_weight,
        ge=0,
        title="Min child weight",
        description="Smallest hessian sum a leaf may hold; larger = more conservative splits",
    )
    subsample: float = Field(
        TrainParams.subsample,
        gt=0,
        le=1,
        title="Row subsample",
        description="Fraction of rows each tree sees",
    )
    colsample_bytree: float = Field(
        TrainParams.colsample_bytree,
        gt=0,
        le=1,
        title="Column subsample per tree",
        description="Fraction of the features each tree sees",
    )
    early_stopping_rounds: int = Field(
        TrainParams.early_stopping_rounds,
        ge=1,
        title="Early stopping rounds",
        description="Stop when the validation metric has not improved for this many rounds",
    )
    seed: int = Field(TrainParams.seed, title="Random seed", description="Same seed and data, same model")
    device: Literal["auto", "cpu", "cuda"] = Field(
        TrainParams.device, title="Device", description="auto: cuda when the Dask workers see a GPU, else cpu"
    )
    external_memory_rows: int = Field(
        TrainParams.external_memory_rows,
        ge=0,
        title="External memory above (rows)",
        description="Trees train from XGBoost's external memory (pages on a worker's disk, not in worker "
        "memory) when the clean data has more rows than this; 0: always. The operator's "
        "CONVEYOR_MAX_IN_MEMORY_ROWS bounds it",
    )

    random_forest: ForestOptions = Field(
        default_factory=ForestOptions,
        title="Random forest settings",
        description="Used when the family is random_forest",
    )
    linear: LinearOptions = Field(
        default_factory=LinearOptions,
        title="Linear model settings",
        description="Used when the family is linear",
    )

    def to_params(self) -> TrainParams:
        values = self.model_dump(exclude={"model", "random_forest", "linear"})
        return TrainParams(
            **values,
            family=self.model,
            random_forest=ForestParams(**self.random_forest.model_dump()),
            linear=LinearParams(**self.linear.model_dump()),
        )


class SearchOptions(BaseModel):
    """Train several candidates in parallel on the cluster and keep the best by a validation metric."""

    model_config = ConfigDict(extra="forbid", title="Search")

    # True here, so search={"budget": 4} in code or JSON means a search; the run form starts it unticked.
    enabled: bool = Field(
        True,
        title="Run a search",
        description="Off: train the one model set in Training. On: train up to Candidates models and keep "
        "the best on the validation slice (the holdout is not used to choose)",
    )
    budget: int = Field(
        SearchParams.budget, ge=1, le=200, title="Candidates", description="Models to train, at most"
    )
    families: list[ModelFamily] = Field(
        default_factory=lambda: list(FAMILIES),
        min_length=1,
        title="Families to try",
        description="Each family's defaults first, then random draws of its hyperparameters",
    )
    metric: Literal["auc", "logloss"] = Field(
        SearchParams.metric,
        title="Validation metric that picks the winner",
        description="auc: higher is better; logloss: lower is better",
    )
    parallelism: OptionalCount = blank_field(  # type: ignore[valid-type]
        0,
        ge=1,
        title="Concurrent candidates",
        description="Models trained at once; 0 = one per Dask worker (one per GPU on a GPU cluster)",
    )
    seed: int = Field(SearchParams.seed, title="Search seed", description="Same seed, same candidates")

    @field_validator("parallelism")
    @classmethod
    def _parallelism(cls, value: int | None) -> int | None:
        return operator.confine_workers(value)

    @field_validator("families")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"families are listed more than once: {value}")
        return value

    def to_params(self) -> SearchParams:
        return SearchParams(
            budget=self.budget,
            families=tuple(self.families),
            metric=self.metric,
            parallelism=self.parallelism,
            seed=self.seed,
        )


def _search_off(value: object) -> object:
    """A search the form left unticked is no search (None)."""
    enabled = value.get("enabled", True) if isinstance(value, dict) else getattr(value, "enabled", True)
    return None if enabled is False else value


def _search_form(schema: dict[str, Any]) -> None:
    """One object in the form, unticked, instead of a switch between the object and "None"."""
    schema.update(next(s for s in schema.pop("anyOf") if "$ref" in s))
    schema["default"] = _SEARCH_OFF


_SEARCH_OFF = SearchOptions(enabled=False).model_dump(mode="json")
SearchChoice = Annotated[
    SearchOptions | None,
    BeforeValidator(_search_off),
    PlainSerializer(
        lambda value: _SEARCH_OFF if value is None else value.model_dump(mode="json"), when_used="json"
    ),
]

_THRESHOLDS = Thresholds()


class MonitorOptions(BaseModel):
    """Monitoring thresholds: a breach emits ``conveyor.monitor.breach``, publishes an artifact and alerts."""

    model_config = ConfigDict(extra="forbid", title="Monitoring thresholds")

    max_row_change: float = Field(
        _THRESHOLDS.max_row_change,
        ge=0,
        title="Max row count change",
        description="Largest relative change of the silver row count vs the last version (0.5 = 50 %)",
    )
    max_null_rate: float = Field(
        _THRESHOLDS.max_null_rate,
        ge=0,
        le=1,
        title="Max null rate per column",
        description="Fraction of a column's values that may be missing",
    )
    null_rate_limits: dict[str, float] = Field(
        default_factory=lambda: dict(_THRESHOLDS.null_rate_limits),
        title="Null rate limits for sparse columns",
        description='Per column, overriding the one above, e.g. {"wind_gust": 0.85} (fractions)',
    )
    max_quarantine_share: float = Field(
        _THRESHOLDS.max_quarantine_share,
        ge=0,
        le=1,
        title="Max quarantined share",
        description="Fraction of the rows read that validation may reject",
    )
    max_psi: float = Field(
        _THRESHOLDS.max_psi,
        ge=0,
        title="Max feature drift (PSI)",
        description="Population stability index of each feature vs the training data (0.1 small, 0.25 large)",
    )
    max_metric_drop: float = Field(
        _THRESHOLDS.max_metric_drop,
        ge=0,
        title="Max metric drop",
        description="How far the monitored holdout metric may fall below the champion's (metric units)",
    )
    metric: Literal["roc_auc", "f1", "accuracy", "log_loss", "brier"] = Field(
        "roc_auc", title="Monitored metric", description="Used when the task has it, else the gate metric"
    )

    def to_thresholds(self) -> Thresholds:
        return Thresholds(**self.model_dump())


def _no_guard(value: object) -> object:
    """None (the old spelling of "no guard") is 1: no metric in [0, 1] regresses by more."""
    return 1.0 if value is None else value


def _spec_metric(value: object) -> object:
    return "spec" if value in ("", None) else value


class PipelineParams(BaseModel):
    """Parameters of a training pipeline, in the run form's order: data, model, resources, operations."""

    model_config = ConfigDict(extra="forbid", title="Pipeline parameters")

    # --- data: what is read, how much of it, how it is split, where results go
    spec: SpecChoice = Field(
        DEFAULT_SPEC,
        title="Data · Pipeline spec",
        description="A shipped spec (flights, county_murders) or the path or URL of your own spec YAML",
    )
    source_url: OptionalText = blank_field(  # type: ignore[valid-type]
        "",
        title="Data · Source data URL",
        description="Folder holding the spec's tables, each as name.csv (or .csv.gz, .zip, .bz2), "
        "name.parquet or a name folder of parquet files; empty = the URLs in the spec",
    )
    max_rows: OptionalCount = blank_field(  # type: ignore[valid-type]
        0,
        ge=1000,
        title="Data · Sample rows",
        description="Use about this many rows of the main table (a deterministic sample, at least 1000); "
        "0 = all rows",
    )
    seed: int = Field(
        IngestParams.seed, title="Data · Sampling seed", description="Same seed and size, same sample"
    )
    train_end: str = Field(
        "",
        title="Data · Train on rows before",
        description="Date (YYYY-MM-DD) that ends the training slice; empty = the spec's split",
    )
    valid_end: str = Field(
        "",
        title="Data · Validate on rows before",
        description="Date (YYYY-MM-DD) that ends the validation slice used for early stopping; later rows "
        "are the holdout; empty = the spec's split",
    )
    storage_url: StorageURL = storage_field("Data · Storage root URL")

    # --- model: what is trained and what it must beat to be promoted
    model: str = Field(
        "",
        pattern=r"^([a-z][a-z0-9_]{0,62})?$",
        title="Model · Model name",
        description="Registry name (lowercase letters, digits, _); empty = the spec's model name",
    )
    training: TrainingOptions = Field(default_factory=TrainingOptions, title="Model · Training")
    search: SearchChoice = Field(
        None,
        title="Model · Search",
        description="Tick Run a search to try several candidates instead of the one model in Training",
        json_schema_extra=_search_form,
    )
    gate_metric: Annotated[GateMetric, BeforeValidator(_spec_metric)] = Field(  # type: ignore[valid-type]
        "spec",
        title="Model · Gate metric",
        description="The holdout metric the deploy gate compares with the champion's; spec = the spec's "
        "(flights: roc_auc). It must be one of the task's metrics",
    )
    gate_tolerance: float = Field(
        GateParams.tolerance,
        ge=0,
        le=0.1,
        title="Model · Gate tolerance",
        description="How much worse than the champion's the challenger's gate metric may be and still be "
        "promoted (metric units)",
    )
    gate_max_calibration_regression: Annotated[float, BeforeValidator(_no_guard)] = Field(
        DEFAULT_GUARDS["calibration_error"],
        ge=0,
        le=1,
        title="Model · Gate guard: calibration error",
        description="Refuse a challenger whose calibration error is worse than the champion's by more than "
        "this; 1 = no guard",
    )
    gate_max_f1_regression: Annotated[float, BeforeValidator(_no_guard)] = Field(
        DEFAULT_GUARDS["f1"],
        ge=0,
        le=1,
        title="Model · Gate guard: F1",
        description="Refuse a challenger whose F1 is lower than the champion's by more than this; "
        "1 = no guard",
    )

    # --- resources: where it runs
    cluster: ClusterChoice = Field(
        "auto",
        title="Resources · Dask cluster",
        description="A local cluster (auto: GPU workers if a GPU is visible, else CPU; cpu; gpu) "
        "or the address of a running Dask scheduler, e.g. tcp://scheduler:8786",
    )
    n_workers: OptionalCount = blank_field(  # type: ignore[valid-type]
        0,
        ge=1,
        title="Resources · Local Dask workers",
        description="Worker processes of a local cluster; 0 = automatic (one per 1-2 CPU cores, or one per "
        "GPU); ignored with a scheduler address",
    )

    # --- operations: time limits, retries, copies, monitoring
    stage_timeouts: dict[str, float] = Field(
        default_factory=dict,
        title="Operations · Stage timeouts (s)",
        description='Seconds per stage, e.g. {"train": 7200}; a stage not named here uses '
        "CONVEYOR_TIMEOUT_TRAIN (etc.), else the policy default",
    )
    retry_backoff_seconds: OptionalSeconds = blank_field(  # type: ignore[valid-type]
        0,
        title="Operations · First retry delay (s)",
        description="Seconds before a stage retries a transient fault (I/O, a lost worker), doubled per "
        "retry, with jitter; 0 = the policy default (5 s, or CONVEYOR_RETRY_BACKOFF)",
    )
    replicas: list[str] = Field(
        default_factory=list,
        title="Operations · Replica storage URLs",
        description="Every version this run commits is copied to these storage roots and verified against "
        "its checksums",
    )
    monitor: MonitorOptions = Field(
        default_factory=MonitorOptions, title="Operations · Monitoring thresholds"
    )

    @field_validator("spec")
    @classmethod
    def _spec_where(cls, value: str) -> str:
        return value if value in shipped_specs() else operator.confine_url(value, "source")

    @field_validator("source_url")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        return operator.confine_url(value, "source") if value else value

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: list[str]) -> list[str]:
        return [operator.confine_url(url, "replica") for url in value]

    @field_validator("n_workers")
    @classmethod
    def _workers(cls, value: int | None) -> int | None:
        return operator.confine_workers(value)

    @field_validator("retry_backoff_seconds")
    @classmethod
    def _backoff(cls, value: float | None) -> float | None:
        return operator.confine_seconds(value, "backoff")

    @field_validator("stage_timeouts")
    @classmethod
    def _timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        from conveyor.policy import STAGES

        for stage, seconds in value.items():
            if stage not in STAGES:
                raise ValueError(f"stage_timeouts: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
            if not seconds > 0:
                raise ValueError(f"stage_timeouts: {stage} must be > 0 seconds, not {seconds}")
            operator.confine_seconds(seconds, "timeout")
        return value

    @field_validator("train_end", "valid_end")
    @classmethod
    def _date(cls, value: str) -> str:
        from datetime import date

        if value:
            date.fromisoformat(value)
        return value

    def ingest_params(self) -> IngestParams:
        return IngestParams(max_rows=self.max_rows, seed=self.seed)

    def train_params(self) -> TrainParams:
        """The training settings; a CPU cluster trains on the CPU even where its workers see a GPU."""
        params = self.training.to_params()
        if self.cluster == "cpu" and params.device == "auto":
            params = dataclasses.replace(params, device="cpu")
        return params

    def load_spec(self) -> LoadedSpec:
        return load_spec(self.spec)

    def split_params(self, loaded: LoadedSpec) -> SplitParams:
        return spec_split(loaded, self.train_end, self.valid_end)

    def model_name(self, loaded: LoadedSpec) -> str:
        return self.model or loaded.spec.model

    def gate_params(self, default_metric: str = GateParams.metric) -> GateParams:
        guards = {
            "calibration_error": self.gate_max_calibration_regression,
            "f1": self.gate_max_f1_regression,
        }
        return GateParams(
            metric=default_metric if self.gate_metric == "spec" else self.gate_metric,
            tolerance=self.gate_tolerance,
            guards={name: limit for name, limit in guards.items() if limit < 1},
        )
