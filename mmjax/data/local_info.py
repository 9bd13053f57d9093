"""The `DatasetInfo` of mmjax's own TFDS builders (`synthetic_patients`, the manifest builder)."""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """A `tfds.core.DatasetInfo` that never looks for precomputed metadata in TFDS's GCS bucket: these
    datasets are built here. TFDS calls `initialize_from_bucket` for every builder whose data is not
    prepared yet, and it makes an empty `/tmp/tmp*tfds` folder before it finds nothing there, and
    never removes it (one per builder constructed: over a thousand after a few test runs)."""

    def initialize_from_bucket(self) -> None:
        return None
