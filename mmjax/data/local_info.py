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


class LocalPreparation:
    """A mixin for mmjax's builders: TFDS prints "Downloading and preparing dataset Unknown size
    (download: Unknown size, ...)" and "... downloaded and prepared" around every preparation,
    although these builders download nothing. They say what they do in their own words instead."""

    def _log_download_bytes(self) -> None:
        print(f"Preparing {self.name}/{self.builder_config.name} in {self.data_dir} (built here from "
              f"{self.SOURCE}; nothing is downloaded)", flush=True)

    def _log_download_done(self) -> None:
        return None
