"""The flagship training flow: ingest -> clean -> train -> evaluate -> deploy on a Dask cluster.

The flow owns the Dask cluster (or is given a scheduler address) and each stage
is one Prefect task that connects a client to it for its partition-parallel
work; tasks pass small typed results (URLs, versions, counts), never dataframes.

    python -m flows.training --help
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from distributed import Client

from flows.cluster import dask_cluster, quiet_dask_logs
from flows.params import PipelineParams
from flows.policy import task_options
from flows.summary import PipelineSummary
from tasks import clean as clean_stage
from tasks import deploy as deploy_stage
from tasks import evaluate as evaluate_stage
from tasks import ingest as ingest_stage
from tasks import train as train_stage
from tasks.clean import CleanResult
from tasks.deploy import DeployResult, GateParams, get_alias
from tasks.evaluate import EvaluationResult
from tasks.ingest import IngestParams, IngestResult
from tasks.storage import Store
from tasks.train import SplitParams, TrainParams, TrainResult


def storage_options() -> dict[str, Any]:
    """fsspec options (endpoint, credentials) from the environment, never from parameters or code."""
    import json

    raw = os.environ.get("CONVEYOR_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CONVEYOR_STORAGE_OPTIONS is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(options, dict):
        raise ValueError("CONVEYOR_STORAGE_OPTIONS must be a JSON object")
    return options


def open_store(storage_url: str) -> Store:
    return Store.from_url(storage_url, storage_options())


def dask_client(address: str) -> Client:
    """A client to the flow's cluster, the default for dask calls inside the stage while open."""
    return Client(address, timeout=60)


@task(**task_options("ingest"))
def ingest_task(address: str, storage_url: str, source_url: str | None, params: IngestParams) -> IngestResult:
    with dask_client(address) as client:
        return ingest_stage.ingest(open_store(storage_url), client, source_url, params, storage_options())


@task(**task_options("clean"))
def clean_task(address: str, storage_url: str, ingested: IngestResult) -> CleanResult:
    with dask_client(address) as client:
        return clean_stage.clean(open_store(storage_url), ingested, client)


@task(**task_options("train"))
def train_task(address: str, storage_url: str, cleaned: CleanResult, params: TrainParams, split: SplitParams, model: str) -> TrainResult:
    with dask_client(address) as client:
        return train_stage.train(open_store(storage_url), cleaned, client, params, split, model)


@task(**task_options("evaluate"))
def evaluate_task(address: str, storage_url: str, cleaned: CleanResult, trained: TrainResult, split: SplitParams) -> EvaluationResult:
    store = open_store(storage_url)
    champion = get_alias(store, trained.model)
    champion_version = champion["version"] if champion else None
    champion_url = store.model_url(trained.model, champion_version) if champion_version else None
    with dask_client(address) as client:
        return evaluate_stage.evaluate(store, cleaned, trained, client, split, champion_url, champion_version)


@task(**task_options("deploy"))
def deploy_task(storage_url: str, cleaned: CleanResult, trained: TrainResult, evaluation: EvaluationResult,
                gate: GateParams) -> DeployResult:
    return deploy_stage.deploy(open_store(storage_url), cleaned, trained, evaluation, gate)


def pipeline(params: PipelineParams, address: str) -> PipelineSummary:
    """The stages, in order, on the Dask cluster at ``address``."""
    logger = get_run_logger()
    url = open_store(params.storage_url).root
    split = params.split_params()
    seconds: dict[str, float] = {}

    def timed(stage: str, future: Any) -> Any:
        started = time.perf_counter()
        result = future.result()
        seconds[stage] = round(time.perf_counter() - started, 2)
        return result

    t0 = time.perf_counter()
    ingested = timed("ingest", ingest_task.submit(address, url, params.source_url, params.ingest_params()))
    logger.info("ingest: %s flights read, %s quarantined", ingested.tables["flights"].rows_read, ingested.rows_quarantined)
    cleaned = timed("clean", clean_task.submit(address, url, ingested))
    logger.info("clean: %s silver rows, %s quarantined %s", cleaned.silver.rows, cleaned.quarantine.rows,
                cleaned.quarantine_reasons)
    trained = timed("train", train_task.submit(address, url, cleaned, params.training.to_params(), split, params.model))
    logger.info("train: model %s on %s (%s rounds, valid AUC %.4f)", trained.version, trained.device,
                trained.best_iteration + 1, trained.valid_auc)
    evaluation = timed("evaluate", evaluate_task.submit(address, url, cleaned, trained, split))
    logger.info("evaluate: holdout AUC %.4f vs baseline %.4f", evaluation.metrics.roc_auc, evaluation.baseline.roc_auc)
    deployed = timed("deploy", deploy_task.submit(url, cleaned, trained, evaluation, params.gate_params()))
    logger.info("deploy: %s (%s)", "promoted" if deployed.promoted else "kept the champion", deployed.reason)
    seconds["total"] = round(time.perf_counter() - t0, 2)

    summary = PipelineSummary.build(url, ingested, cleaned, trained, evaluation, deployed, seconds,
                                    flow_run_id=str(flow_run.get_id() or ""))
    _publish_artifacts(summary, evaluation, deployed)
    return summary


def _publish_artifacts(summary: PipelineSummary, evaluation: EvaluationResult, deployed: DeployResult) -> None:
    key = summary.model.replace("_", "-")
    verdict = f"**Deploy:** {'promoted to champion' if deployed.promoted else 'champion kept'} ({deployed.reason})"
    create_markdown_artifact(key=f"{key}-report", markdown=f"{evaluation.report_markdown}\n\n{verdict}",
                             description=f"Evaluation of {summary.model} {summary.model_version}")
    rows = [{"metric": k, "model": v, "baseline": asdict(evaluation.baseline)[k]}
            for k, v in asdict(evaluation.metrics).items() if isinstance(v, float)]
    create_table_artifact(key=f"{key}-metrics", table=rows, description="Holdout metrics, model vs naive baseline")


@flow(name="conveyor-training")
def training(params: PipelineParams = PipelineParams()) -> PipelineSummary:
    """Train, evaluate and (if it passes the gate) promote the flight-delay model.

    The Dask cluster is chosen here, at the edge, from ``params.cluster``.
    """
    quiet_dask_logs()
    with dask_cluster(params.cluster, params.n_workers) as address:
        return pipeline(params, address)


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["run", *__import__("sys").argv[1:]]))
