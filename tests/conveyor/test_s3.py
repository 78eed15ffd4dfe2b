"""The storage layer against a real S3 protocol server (moto) through s3fs."""

from __future__ import annotations

import pandas as pd
import pytest

from conveyor.store.storage import (
    StorageError,
    Store,
    commit_dataset,
    committed,
    open_manifest,
    read_dataset_pandas,
)


def test_commit_and_read_back_on_s3(s3_options) -> None:
    store = Store.from_url("s3://conveyor-test/root", s3_options)
    url = store.dataset_url("demo", "v1")
    with store.fs.open(f"{store.path(url)}/part-0.parquet", "wb") as fh:
        pd.DataFrame({"a": [1, 2, 3]}).to_parquet(fh, index=False)
    assert committed(store, "demo", "v1") is None  # parts alone are not a version
    with pytest.raises(StorageError, match="never committed"):
        open_manifest(store, url)

    commit_dataset(store, "demo", "v1", url, lineage={}, parallel=False)

    assert committed(store, "demo", "v1").rows == 3
    assert read_dataset_pandas(store, url)["a"].tolist() == [1, 2, 3]
