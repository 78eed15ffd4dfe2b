"""Batch scoring flow: score raw files or a committed dataset with the champion on the Dask cluster.

Raw files (``source_url``: rows shaped like the spec's main table, no label)
go through the spec's own typing, rules, joins and derived columns in
inference mode (conveyor.tasks.inference); rows that cannot be scored are
reported with their reason, never dropped.

One Prefect task (the stage); its parallelism is Dask's partitions. The
predictions are a dataset version of their own (parts, then ``_manifest.json``
last), named by the input version, model version and code, so a rerun is free.

    python -m conveyor.flows.scoring --help
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, model_validator

from conveyor import operator
from conveyor.cluster import dask_cluster, quiet_dask_logs
from conveyor.flows.params import (
    ClusterChoice,
    OptionalCount,
    OptionalText,
    blank_field,
    cluster_field,
    model_field,
    storage_field,
    workers_field,
)
from conveyor.policy import POLICIES, task_options
from conveyor.resources import dask_client, open_store, options_for
from conveyor.store.registry import CHAMPION
from conveyor.tasks import scoring as scoring_stage
from conveyor.tasks.inference import score_raw
from conveyor.tasks.scoring import ScoringResult


class ScoringParams(BaseModel):
    """Parameters of the batch scoring flow."""

    model_config = ConfigDict(extra="forbid")

    source_url: str = Field(
        "",
        title="Raw files to score",
        description="CSV/parquet rows shaped like the spec's main table (no label): a file, a folder of "
        "parquet parts, or a folder holding <main table>.csv; give this or a dataset URL",
    )
    input_url: str = Field(
        "",
        title="Dataset to score",
        description="a committed feature dataset version URL (with _manifest.json)",
    )
    export_url: str = Field(
        "",
        title="Export predictions to",
        description="also write the predictions here: a .csv file or a "
        "parquet folder URL; empty = only the committed predictions dataset",
    )
    spec: str = Field(
        "",
        title="Expected pipeline spec",
        description="refuse a model trained with another spec; empty = any",
    )
    storage_url: str = storage_field()
    model: str = model_field()
    version: OptionalText = blank_field(  # type: ignore[valid-type]
        "", title="Model version", description="A registered version to score with; empty = the alias's"
    )
    alias: str = Field(CHAMPION, title="Alias")
    keep: list[str] | None = Field(
        None,
        title="Columns to copy next to the predictions",
        description="empty = the model's time column and label when present",
    )
    output_name: OptionalText = blank_field(  # type: ignore[valid-type]
        "",
        title="Output dataset name",
        description="Name of the predictions dataset; empty = predictions_<model>",
    )
    cluster: ClusterChoice = cluster_field()
    n_workers: OptionalCount = workers_field()  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_input(self) -> ScoringParams:
        if bool(self.source_url) == bool(self.input_url):
            raise ValueError("give exactly one of source_url (raw files) or input_url (a committed dataset)")
        # What a form or an event may name is confined by the operator's settings (conveyor.operator).
        self.storage_url = operator.confine_url(self.storage_url, "storage")
        if self.source_url:
            self.source_url = operator.confine_url(self.source_url, "source")
        if self.input_url:  # a committed dataset under an allowed storage root (this one or another)
            self.input_url = operator.confine_url(self.input_url, "storage")
        if self.export_url:
            try:
                self.export_url = operator.confine_url(self.export_url, "replica")
            except ValueError:
                self.export_url = operator.confine_url(self.export_url, "storage")
        for name in ("version", "output_name"):
            if getattr(self, name):
                operator.confine_name(getattr(self, name), name)
        operator.confine_name(self.alias, "alias")
        operator.confine_workers(self.n_workers)
        return self


def stage_options(stage: str, like: str) -> dict[str, Any]:
    """The policy of ``stage`` from conveyor/policy.py, or of the stage it resembles until it has its own."""
    if stage in POLICIES:
        return task_options(stage)
    return task_options(like) | {"name": stage}


@task(**stage_options("score", like="evaluate"))
def score_task(address: str, params: ScoringParams) -> ScoringResult:
    store = open_store(params.storage_url)
    with dask_client(address) as client:
        if params.source_url:
            return score_raw(
                store,
                client,
                params.source_url,
                params.model,
                params.version,
                params.alias,
                params.keep,
                params.output_name,
                params.export_url or None,
                options_for(params.source_url),
                expect_spec=params.spec,
            )
        return scoring_stage.score_dataset(
            store,
            client,
            params.input_url,
            params.model,
            params.version,
            params.alias,
            params.keep,
            params.output_name,
        )


@flow(name="conveyor-batch-scoring")
def batch_scoring(params: ScoringParams) -> ScoringResult:
    """Score ``params.input_url`` with the model's champion (or a pinned version) on the Dask cluster."""
    quiet_dask_logs()
    logger = get_run_logger()
    with dask_cluster(params.cluster, params.n_workers) as address:
        result = score_task.submit(address, params).result()
    logger.info(
        "scored %s rows of %s with %s %s -> %s%s",
        f"{result.rows:,}",
        result.input_url,
        result.model,
        result.model_version,
        result.predictions.url,
        " (already done)" if result.reused else "",
    )
    if result.quarantined:
        logger.warning(
            "%s rows could not be scored (%s): %s",
            f"{result.quarantined:,}",
            result.quarantine_url,
            result.quarantine_reasons,
        )
    create_markdown_artifact(
        key=f"{result.model.replace('_', '-')}-scoring",
        markdown=(
            f"Scored **{result.rows:,}** rows of `{result.input_url}` with {result.model} "
            f"`{result.model_version}` ({result.task}); {result.describe()}.\n\n"
            f"Predictions: `{result.predictions.url}`"
            + (
                f"\n\nNot scored: **{result.quarantined:,}** rows (`{result.quarantine_url}`): "
                + ", ".join(f"{why}: {n:,}" for why, n in result.quarantine_reasons.items())
                if result.quarantined
                else ""
            )
        ),
        description="Batch scoring",
    )
    return result


if __name__ == "__main__":
    from conveyor.launch import flow_main

    raise SystemExit(flow_main(batch_scoring, ScoringParams))
