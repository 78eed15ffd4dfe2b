"""``spread`` keeps every row of a slice, also when the query planner prunes partitions of the read."""

from __future__ import annotations

import pytest

from conveyor.tasks import train


@pytest.mark.parametrize("part", ["train", "valid", "holdout"])
def test_every_row_of_a_time_slice_is_placed(pipeline_run, dask_client, part) -> None:
    """Seen: with the time filter pushed into the parquet read, the valid slice came out empty (train then
    stopped at round 0 on an empty validation set)."""
    store, cleaned = pipeline_run.store, pipeline_run.cleaned
    frame = train.load_split(store, cleaned.silver.url, None, part, [*cleaned.features, cleaned.schema.label])
    expected = len(frame)
    placed, rows = train.spread(dask_client, frame)
    lengths = placed.map_partitions(len).compute().tolist()
    assert expected > 0 and rows == expected and sum(lengths) == expected, lengths
    assert all(n > 0 for n in lengths), lengths
