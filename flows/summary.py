"""The machine-readable run summary (``--summary-json``) and its short table for humans."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from conveyor.tasks.clean import CleanResult
from conveyor.tasks.deploy import DeployResult
from conveyor.tasks.evaluate import HEADLINE, EvaluationResult, higher_is_better
from conveyor.tasks.ingest import IngestResult
from conveyor.tasks.train import TrainResult


def main_table(ingested: IngestResult) -> str:
    """The table silver rows come from: ``IngestResult.main`` where ingest names it, else its first one."""
    return getattr(ingested, "main", None) or next(iter(ingested.tables))


@dataclass(frozen=True)
class PipelineSummary:
    storage_url: str
    datasets: dict[str, dict[str, Any]]  # name -> version, url, rows
    rows_quarantined: int
    quarantine_reasons: dict[str, int]
    model: str
    model_version: str
    model_url: str
    features: list[str]
    device: str
    best_iteration: int
    metrics: dict[str, Any]
    baseline_name: str
    baseline_metrics: dict[str, Any]
    champion_metrics: dict[str, Any] | None
    holdout_rows: int
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gate_reason: str
    plots: dict[str, str]
    stage_seconds: dict[str, float]
    flow_run_id: str = ""
    reused: list[str] = field(default_factory=list)  # stages whose committed output was found, not recomputed
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = "gbtree"
    search: dict[str, Any] = field(
        default_factory=dict
    )  # winner, candidates, parallelism, seconds (no leaderboard)
    task: str = "binary"
    gate_metric: str = "roc_auc"
    main_table: str = ""  # the ingested table the silver rows come from
    silver_name: str = ""

    @classmethod
    def build(
        cls,
        storage_url: str,
        ingested: IngestResult,
        cleaned: CleanResult,
        trained: TrainResult,
        evaluation: EvaluationResult,
        deployed: DeployResult,
        seconds: dict[str, float],
        flow_run_id: str = "",
    ) -> PipelineSummary:
        datasets = {}
        for t in ingested.tables.values():
            for ref in (t.bronze, t.quarantine):
                key = ref.name if ref is t.bronze else f"quarantine/{ref.name}"
                datasets[key] = {"version": ref.version, "url": ref.url, "rows": ref.rows}
        datasets[cleaned.silver.name] = asdict(cleaned.silver)
        datasets[f"quarantine/{cleaned.quarantine.name}"] = asdict(cleaned.quarantine)
        reasons: dict[str, int] = dict(cleaned.quarantine_reasons)
        for name, t in ingested.tables.items():
            if t.quarantine.rows:
                reasons[f"{name}: unparseable values at ingest"] = t.quarantine.rows
        champion = evaluation.champion
        return cls(
            storage_url=storage_url,
            datasets=datasets,
            rows_quarantined=cleaned.quarantine.rows + ingested.rows_quarantined,
            quarantine_reasons=reasons,
            model=trained.model,
            model_version=trained.version,
            model_url=trained.model_url,
            features=trained.features,
            device=trained.device,
            best_iteration=trained.best_iteration,
            metrics=asdict(evaluation.metrics),
            baseline_name=evaluation.baseline_name,
            baseline_metrics=asdict(evaluation.baseline),
            champion_metrics=asdict(champion.metrics) if champion and champion.metrics else None,
            holdout_rows=evaluation.holdout_rows,
            promoted=deployed.promoted,
            champion_before=deployed.champion_before,
            champion_after=deployed.champion_after,
            gate_reason=deployed.reason,
            plots=evaluation.plots,
            stage_seconds=seconds,
            flow_run_id=flow_run_id,
            family=trained.family,
            task=evaluation.task,
            gate_metric=evaluation.gate_metric,
            main_table=main_table(ingested),
            silver_name=cleaned.silver.name,
            search={k: v for k, v in trained.search.items() if k != "leaderboard"}
            | ({"candidates": len(trained.search["leaderboard"])} if trained.search else {}),
            reused=[
                stage
                for stage, result in (
                    ("ingest", ingested),
                    ("clean", cleaned),
                    ("train", trained),
                    ("evaluate", evaluation),
                )
                if result.reused
            ],
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def _metric_rows(self) -> list[tuple[str, str]]:
        m, b = self.metrics, self.baseline_metrics
        names = dict.fromkeys([self.gate_metric, *HEADLINE.get(self.task, ())])
        rows = []
        for n in names:
            if n not in m:
                continue
            lift = m[n] - b[n] if higher_is_better(n) else b[n] - m[n]
            text = f"{m[n]:.4f}  vs baseline {b[n]:.4f}  (lift {lift:+.4f})"
            if n == "f1" and "threshold" in m:
                text += f"  (threshold {m['threshold']:.3f} from validation)"
            label = "ROC AUC" if n == "roc_auc" else n.replace("_", " ")
            rows.append((f"holdout {label}", text))
        return rows

    def table(self) -> str:
        main = self.main_table or "flights"
        bronze = self.datasets.get(f"bronze_{main}", {}).get("rows", 0)
        read = bronze + self.datasets.get(f"quarantine/bronze_{main}", {}).get("rows", 0)
        silver = self.datasets.get(self.silver_name or "silver_flights", {})
        rows = [
            (f"{main} read", f"{read:,}"),
            ("silver rows", f"{silver.get('rows', 0):,}  (version {silver.get('version', '-')})"),
            (
                "quarantined",
                f"{self.rows_quarantined:,}  "
                + "; ".join(f"{k}: {v:,}" for k, v in self.quarantine_reasons.items()),
            ),
            (
                "model",
                f"{self.model} {self.model_version}  ({self.family} {self.task} on {self.device}, "
                f"{self.best_iteration + 1} {'iterations' if self.family == 'linear' else 'rounds'})",
            ),
            *(
                [
                    (
                        "search",
                        f"winner candidate {self.search['winner']} of {self.search['candidates']} "
                        f"(validation {self.search['metric']}, {self.search['parallelism']} parallel slots, "
                        f"{self.search['seconds']:.1f} s)",
                    )
                ]
                if self.search
                else []
            ),
            *self._metric_rows(),
            (
                "champion",
                f"{self.champion_before or '-'} -> {self.champion_after or '-'}  ({self.gate_reason})",
            ),
            ("stage seconds", "  ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items())),
            (
                "reused",
                ", ".join(self.reused) + " (committed by an earlier run)"
                if self.reused
                else "nothing (all computed)",
            ),
            ("model folder", self.model_url),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
