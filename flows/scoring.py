"""Batch scoring flow: score a committed dataset with the champion on the Dask cluster.

One Prefect task (the stage); its parallelism is Dask's partitions. The
predictions are a dataset version of their own (parts, then ``_manifest.json``
last), named by the input version, model version and code, so a rerun is free.

    python -m conveyor.flows.scoring --help
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from conveyor.cluster import dask_cluster, quiet_dask_logs
from conveyor.flows.params import ClusterChoice, cluster_field, model_field, storage_field
from conveyor.policy import POLICIES, task_options
from conveyor.resources import dask_client, open_store
from conveyor.store.registry import CHAMPION
from conveyor.tasks import scoring as scoring_stage
from conveyor.tasks.scoring import ScoringResult


class ScoringParams(BaseModel):
    """Parameters of the batch scoring flow."""

    model_config = ConfigDict(extra="forbid")

    input_url: str = Field(
        ..., title="Dataset to score", description="a committed dataset version URL (with _manifest.json)"
    )
    storage_url: str = storage_field()
    model: str = model_field()
    version: str | None = Field(
        None, title="Model version", description="empty = the version the alias points at"
    )
    alias: str = Field(CHAMPION, title="Alias")
    keep: list[str] | None = Field(
        None,
        title="Columns to copy next to the predictions",
        description="empty = sched_dep and is_late when present",
    )
    output_name: str | None = Field(
        None, title="Output dataset name", description="empty = predictions_<model>"
    )
    cluster: ClusterChoice = cluster_field()
    n_workers: int | None = Field(None, ge=1, title="Local Dask workers")


def stage_options(stage: str, like: str) -> dict[str, Any]:
    """The policy of ``stage`` from conveyor/policy.py, or of the stage it resembles until it has its own."""
    if stage in POLICIES:
        return task_options(stage)
    return task_options(like) | {"name": stage, "tags": ["conveyor", f"stage:{stage}"]}


@task(**stage_options("score", like="evaluate"))
def score_task(address: str, params: ScoringParams) -> ScoringResult:
    store = open_store(params.storage_url)
    with dask_client(address) as client:
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
    create_markdown_artifact(
        key=f"{result.model.replace('_', '-')}-scoring",
        markdown=(
            f"Scored **{result.rows:,}** rows of `{result.input_url}` with {result.model} "
            f"`{result.model_version}`; {result.positive_rate:.1%} predicted late.\n\n"
            f"Predictions: `{result.predictions.url}`"
        ),
        description="Batch scoring",
    )
    return result


if __name__ == "__main__":
    from conveyor.launch import flow_main

    raise SystemExit(flow_main(batch_scoring, ScoringParams))
