"""The flagship training flow: ingest -> clean -> train -> evaluate -> deploy on a Dask cluster.

The flow owns the Dask cluster (or is given a scheduler address) and each stage
is one Prefect task that connects a client to it for its partition-parallel
work; tasks pass small typed results (URLs, versions, counts), never dataframes.

    python -m conveyor.flows.training --help
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from distributed import Client
from fsspec.core import url_to_fs
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from conveyor import operator
from conveyor.alerts import mark_stage, on_cancellation, on_crashed, on_failure
from conveyor.cluster import dask_cluster, quiet_dask_logs
from conveyor.cluster import resolve as resolve_cluster
from conveyor.flows.monitoring import monitor_data_task, monitor_model_task
from conveyor.flows.params import PipelineParams
from conveyor.flows.summary import PipelineSummary
from conveyor.policy import POLICIES, policy_for, run_stage, task_options
from conveyor.quiet import quiet_workers
from conveyor.resources import dask_client, open_store, options_for
from conveyor.tasks import clean as clean_stage
from conveyor.tasks import deploy as deploy_stage
from conveyor.tasks import evaluate as evaluate_stage
from conveyor.tasks import evaluation_record, reference
from conveyor.tasks import ingest as ingest_stage
from conveyor.tasks import search as search_stage
from conveyor.tasks import train as train_stage
from conveyor.tasks.clean import CleanResult
from conveyor.tasks.deploy import DeployResult, GateParams, get_alias
from conveyor.tasks.evaluate import EvaluationResult
from conveyor.tasks.ingest import IngestParams, IngestResult
from conveyor.tasks.search import SearchParams
from conveyor.tasks.spec import LoadedSpec, SplitParams
from conveyor.tasks.train import TrainParams, TrainResult

logger = logging.getLogger(__name__)

# Each stage task runs its body through run_stage: a Dask client of its own, stopped at the stage's limit.


@task(**task_options("ingest"))
def ingest_task(
    address: str,
    storage_url: str,
    spec: LoadedSpec,
    source_url: str | None,
    params: IngestParams,
    timeout_seconds: float = POLICIES["ingest"].timeout_seconds,
    restart_workers: bool = True,
) -> IngestResult:
    return run_stage(
        "ingest",
        lambda client: ingest_stage.ingest(
            open_store(storage_url),
            client,
            source_url,
            params,
            options_for(source_url) if source_url else {},
            spec,
        ),
        address,
        timeout_seconds,
        restart_workers,
    )


@task(**task_options("clean"))
def clean_task(
    address: str,
    storage_url: str,
    ingested: IngestResult,
    spec: LoadedSpec,
    split: SplitParams,
    timeout_seconds: float = POLICIES["clean"].timeout_seconds,
    restart_workers: bool = True,
) -> CleanResult:
    return run_stage(
        "clean",
        lambda client: clean_stage.clean(
            open_store(storage_url), ingested, client, spec, split.train_end, split.valid_end
        ),
        address,
        timeout_seconds,
        restart_workers,
    )


@task(**task_options("train"))
def train_task(
    address: str,
    storage_url: str,
    cleaned: CleanResult,
    params: TrainParams,
    split: SplitParams,
    model: str,
    timeout_seconds: float = POLICIES["train"].timeout_seconds,
    restart_workers: bool = True,
) -> TrainResult:
    return run_stage(
        "train",
        lambda client: train_stage.train(
            open_store(storage_url), cleaned, client, params, split, model, prepare_workers=quiet_workers
        ),
        address,
        timeout_seconds,
        restart_workers,
    )


@task(**task_options("train"))
def search_task(
    address: str,
    storage_url: str,
    cleaned: CleanResult,
    search: SearchParams,
    params: TrainParams,
    split: SplitParams,
    model: str,
    timeout_seconds: float = POLICIES["train"].timeout_seconds,
    restart_workers: bool = True,
) -> TrainResult:
    return run_stage(
        "train",
        lambda client: search_stage.run_search(
            open_store(storage_url), cleaned, client, search, params, split, model
        ),
        address,
        timeout_seconds,
        restart_workers,
    )


def _evaluate(
    client: Client, storage_url: str, cleaned: CleanResult, trained: TrainResult, split: SplitParams
) -> EvaluationResult:
    store = open_store(storage_url)
    champion = get_alias(store, trained.model)
    champion_version = champion["version"] if champion else None
    champion_url = store.model_url(trained.model, champion_version) if champion_version else None
    record = evaluation_record.record_url(cleaned, trained, split, champion_version)
    done = evaluation_record.load(store, record)
    if done is not None:
        return done
    result = evaluate_stage.evaluate(store, cleaned, trained, client, split, champion_url, champion_version)
    evaluation_record.save(store, record, result)
    return result


@task(**task_options("evaluate"))
def evaluate_task(
    address: str,
    storage_url: str,
    cleaned: CleanResult,
    trained: TrainResult,
    split: SplitParams,
    timeout_seconds: float = POLICIES["evaluate"].timeout_seconds,
    restart_workers: bool = True,
) -> EvaluationResult:
    return run_stage(
        "evaluate",
        lambda client: _evaluate(client, storage_url, cleaned, trained, split),
        address,
        timeout_seconds,
        restart_workers,
    )


@task(**task_options("deploy"))
def deploy_task(
    storage_url: str,
    cleaned: CleanResult,
    trained: TrainResult,
    evaluation: EvaluationResult,
    gate: GateParams,
    timeout_seconds: float = POLICIES["deploy"].timeout_seconds,
) -> DeployResult:
    return run_stage(
        "deploy",
        lambda _: _deploy(open_store(storage_url), cleaned, trained, evaluation, gate),
        None,
        timeout_seconds,
    )


def _deploy(
    store: Any, cleaned: CleanResult, trained: TrainResult, evaluation: EvaluationResult, gate: GateParams
) -> DeployResult:
    """Deploy, judged also on the operator's reference holdout when one is pinned for this model and
    there is a champion to compare with."""
    ref = reference.pinned(trained.model)
    champion = get_alias(store, trained.model)
    scores = None
    if ref is not None and champion is not None and champion["version"] != trained.version:
        metric = deploy_stage.gate_metric(evaluation, gate)
        champion_url = store.model_url(trained.model, champion["version"])
        scores = reference.score_reference(store, ref, metric, trained.model_url, champion_url)
        logger.info(
            "reference holdout %s: challenger %s, champion %s (%s)%s",
            ref,
            scores.challenger,
            scores.champion,
            metric,
            f"; {scores.note}" if scores.note else "",
        )
    return deploy_stage.deploy(store, cleaned, trained, evaluation, gate, scores)


def cluster_has_gpus(address: str) -> bool:
    """Whether every worker of the cluster sees a GPU (a dask-cuda cluster): its GPU stages carry GPU_TAG."""
    with dask_client(address) as client:
        return train_stage.workers_have_gpus(client)


def run_versions(ingested: IngestResult, cleaned: CleanResult, trained: TrainResult) -> list[str]:
    """The ``kind/name/version`` of everything this run committed (or reused)."""
    refs = [r for t in ingested.tables.values() for r in (t.bronze, t.quarantine)] + [
        cleaned.silver,
        cleaned.quarantine,
    ]
    rels = [f"{'quarantine' if '/quarantine/' in r.url else 'datasets'}/{r.name}/{r.version}" for r in refs]
    return rels + [f"models/{trained.model}/{trained.version}"]


@task(**task_options("replicate"))
def replicate_task(storage_url: str, replica_urls: list[str], rels: list[str]) -> dict[str, dict[str, int]]:
    """Copy the run's versions to every replica root, verified; fail loudly if any copy does not verify."""
    from conveyor.store.maintenance import replicate

    reports = replicate(open_store(storage_url), [open_store(u) for u in replica_urls], rels)
    failed = {root: r.failed for root, r in reports.items() if not r.ok}
    if failed:
        raise RuntimeError(f"replication failed: {failed}")
    get_run_logger().info("replicated %d versions to %s", len(rels), ", ".join(reports))
    return {root: {"copied": len(r.copied), "skipped": len(r.skipped)} for root, r in reports.items()}


def confine_spec(loaded: LoadedSpec, source_url: str | None) -> None:
    """What a spec chosen in a form may read or run is confined like every other parameter.

    Its sources lie under the allowed source prefixes (or inside an installed package), and its
    feature hooks name modules the operator listed in CONVEYOR_ALLOWED_HOOK_MODULES.
    """
    import os

    if not source_url:  # a source folder given as a parameter was confined by the parameter model
        for alias, src in loaded.spec.sources.items():
            if src.url.startswith("package://"):
                if any(part in ("", ".", "..") for part in src.url.removeprefix("package://").split("/")):
                    raise operator.OperatorError(
                        f"{loaded.where}: sources.{alias}.url: {src.url!r} leaves its package"
                    )
            else:
                operator.confine_url(src.url, "source")
    allowed = [m.strip() for m in os.environ.get("CONVEYOR_ALLOWED_HOOK_MODULES", "").split(",") if m.strip()]
    for hook in loaded.spec.hooks:
        module = hook.function.partition(":")[0]
        if not any(module == a or module.startswith(a + ".") for a in allowed):
            raise operator.OperatorError(
                f"{loaded.where}: hooks: module {module!r} is not in CONVEYOR_ALLOWED_HOOK_MODULES "
                f"({', '.join(allowed) or 'none'}); an operator lists the modules a spec may run"
            )


def warm_imports() -> None:
    """Import what the run will (xgboost with scikit-learn, matplotlib: 1.2 s on 2 cores, measured;
    dask.dataframe; what Prefect's flow engine imports only once a run starts: graphviz for
    ``flow.visualize``, FastAPI's JSON encoder for the parameters, the task engine: 0.25 s) while a
    Prefect server boots and the command would only wait, so the first run starts and trains warm. A
    command that finds a server up (a rerun, every stage reused) does not call this: the flow's own
    imports leave these libraries to the stages that need them."""
    import dask.dataframe  # noqa: F401  (the stages' frames; with dask.array and scipy: 0.5 s)
    import fastapi.encoders  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import prefect.utilities.visualization  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import xgboost.dask  # noqa: F401


SIZING_TIMEOUT_S = 10.0


def source_bytes(params: PipelineParams) -> int | None:
    """Bytes stored in the run's source tables, when ``cluster=auto`` needs them to pick in-process
    workers; None when they are not needed or cannot be listed within SIZING_TIMEOUT_S (a hung store
    is the ingest stage's to time out, with its own limit and error)."""
    if params.cluster != "auto":
        return None
    loaded = params.load_spec()
    confine_spec(loaded, params.source_url)  # list only what this run may read
    found: dict[str, int] = {}

    def measure() -> None:
        total = 0
        for alias in loaded.spec.sources:
            options = options_for(params.source_url) if params.source_url else {}
            url = ingest_stage.table_url(loaded, alias, params.source_url, options)
            fs, path = url_to_fs(url, **options_for(url))
            total += int(fs.du(path)) if fs.isdir(path) else int(fs.size(path))
        found["bytes"] = total

    def guarded() -> None:
        try:
            measure()
        except Exception:  # a missing or unreadable source fails in the ingest stage, with its own error
            pass

    worker = threading.Thread(target=guarded, name="conveyor-source-size", daemon=True)
    worker.start()
    worker.join(SIZING_TIMEOUT_S)
    return found.get("bytes")


def pipeline(params: PipelineParams, address: str, restart_workers: bool | None = None) -> PipelineSummary:
    """The stages, in order, on the Dask cluster at ``address``, each under its policy (conveyor.policy)."""
    logger = get_run_logger()
    url = open_store(params.storage_url).root
    spec = params.load_spec()
    confine_spec(spec, params.source_url)
    split = params.split_params(spec)
    model = params.model_name(spec)
    reference.pinned(model)  # a malformed operator setting fails here, before any stage
    run_id = str(flow_run.get_id() or "")
    # Restart workers of a stopped stage only on a cluster this flow owns.
    owned = "://" not in params.cluster if restart_workers is None else restart_workers
    thresholds = params.monitor.to_thresholds()
    seconds: dict[str, float] = {}

    gpu = params.cluster != "cpu" and cluster_has_gpus(address)

    def stage(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        policy = policy_for(name, params.stage_timeouts, params.retry_backoff_seconds)
        configured = fn.with_options(
            **task_options(name, params.stage_timeouts, params.retry_backoff_seconds, gpu=gpu)
            | {"name": fn.name}
        )
        mark_stage(run_id, name)
        started = time.perf_counter()
        result = configured.submit(*args, timeout_seconds=policy.timeout_seconds, **kwargs).result()
        seconds[name] = round(time.perf_counter() - started, 2)
        return result

    t0 = time.perf_counter()
    ingested = stage(
        "ingest",
        ingest_task,
        address,
        url,
        spec,
        params.source_url,
        params.ingest_params(),
        restart_workers=owned,
    )
    logger.info(
        "ingest (spec %s): %s %s rows read, %s quarantined",
        spec.spec.name,
        ingested.tables[spec.spec.main].rows_read,
        spec.spec.main,
        ingested.rows_quarantined,
    )
    cleaned = stage("clean", clean_task, address, url, ingested, spec, split, restart_workers=owned)
    logger.info(
        "clean: %s silver rows, %s quarantined %s",
        cleaned.silver.rows,
        cleaned.quarantine.rows,
        cleaned.quarantine_reasons,
    )
    data_check = stage(
        "monitor",
        monitor_data_task,
        address,
        url,
        cleaned,
        model,
        thresholds,
        flow_run_id=run_id,
        restart_workers=owned,
    )
    if params.search is not None:
        trained = stage(
            "train",
            search_task,
            address,
            url,
            cleaned,
            params.search.to_params(),
            params.train_params(),
            split,
            model,
            restart_workers=owned,
        )
        _publish_leaderboard(model, trained)
    else:
        trained = stage(
            "train",
            train_task,
            address,
            url,
            cleaned,
            params.train_params(),
            split,
            model,
            restart_workers=owned,
        )
    valid = ", ".join(f"{k} {v:.4f}" for k, v in (trained.valid_metrics or {}).items())
    logger.info(
        "train: %s %s model %s on %s (%s rounds; validation %s)",
        trained.family,
        trained.task,
        trained.version,
        trained.device,
        trained.best_iteration + 1,
        valid,
    )
    evaluation = stage(
        "evaluate", evaluate_task, address, url, cleaned, trained, split, restart_workers=owned
    )
    logger.info("evaluate: %s", evaluation.headline())
    model_check = monitor_model_task.submit(trained, evaluation, thresholds, flow_run_id=run_id).result()
    deployed = stage(
        "deploy",
        deploy_task,
        url,
        cleaned,
        trained,
        evaluation,
        params.gate_params(cleaned.schema.gate_metric),
    )
    logger.info("deploy: %s (%s)", "promoted" if deployed.promoted else "kept the champion", deployed.reason)
    replicas = (
        replicate_task(url, params.replicas, run_versions(ingested, cleaned, trained))
        if params.replicas
        else {}
    )
    seconds.pop("monitor", None)
    seconds["total"] = round(time.perf_counter() - t0, 2)
    mark_stage(run_id, None)

    summary = PipelineSummary.build(
        url, ingested, cleaned, trained, evaluation, deployed, seconds, flow_run_id=run_id
    )
    summary.extra["monitor_breaches"] = data_check.breaches + model_check.breaches
    if replicas:
        summary.extra["replicas"] = replicas
    _publish_artifacts(summary, evaluation, deployed)
    return summary


def _publish_leaderboard(model: str, trained: TrainResult) -> None:
    from conveyor.tasks.search import SearchSummary

    record = trained.search
    summary = SearchSummary.of(record)
    get_run_logger().info(
        "search: %d candidates in %d parallel slots (%.1f s%s); winner candidate %s (%s, valid %s %.4f)",
        len(summary.rows),
        record["parallelism"],
        record["seconds"],
        ", reused" if trained.reused else "",
        record["winner"],
        trained.family,
        record["metric"],
        (trained.valid_metrics or {}).get(record["metric"], float("nan")),
    )
    create_table_artifact(
        key=f"{model.replace('_', '-')}-leaderboard",
        table=summary.rows,
        description=f"Search {record['version']}: candidates ranked by validation {record['metric']} "
        "(the holdout is not used to choose)",
    )


def _publish_artifacts(
    summary: PipelineSummary, evaluation: EvaluationResult, deployed: DeployResult
) -> None:
    key = summary.model.replace("_", "-")
    verdict = (
        f"**Deploy:** {'promoted to champion' if deployed.promoted else 'champion kept'} ({deployed.reason})"
    )
    create_markdown_artifact(
        key=f"{key}-report",
        markdown=f"{deployed.report_markdown or evaluation.report_markdown}\n\n{verdict}",
        description=f"Evaluation of {summary.model} {summary.model_version}",
    )
    rows = [
        {"metric": k, "model": v, "baseline": asdict(evaluation.baseline)[k]}
        for k, v in asdict(evaluation.metrics).items()
        if isinstance(v, float)
    ]
    create_table_artifact(
        key=f"{key}-metrics", table=rows, description="Holdout metrics, model vs naive baseline"
    )


@flow(
    name="conveyor-training",
    on_failure=[on_failure],
    on_crashed=[on_crashed],
    on_cancellation=[on_cancellation],
)
def training(params: PipelineParams = PipelineParams()) -> PipelineSummary:
    """Train, evaluate and (if it passes the gate) promote the flight-delay model.

    The Dask cluster is chosen here, at the edge, from ``params.cluster``.
    """
    quiet_dask_logs()
    data_bytes = source_bytes(params)
    choice = resolve_cluster(params.cluster, params.n_workers, data_bytes)
    with dask_cluster(params.cluster, params.n_workers, data_bytes) as address:
        # Workers of a stopped stage are restarted only on a cluster of worker processes this flow owns.
        return pipeline(params, address, restart_workers=choice.kind != "address" and choice.processes)


if __name__ == "__main__":
    from conveyor.launch import flow_main

    raise SystemExit(flow_main(training, PipelineParams))
