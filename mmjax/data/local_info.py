"""The `DatasetInfo` of mmjax's own TFDS builders (`synthetic_patients`, the manifest builder), and
their preparation made safe: one preparation of a dataset at a time, none of an interrupted one's
files left behind."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil

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


def config_dir(builder) -> str:
    """`<data_dir>/<dataset>/<config>`: the folder of one config's versions, and of its preparation's
    temporary files (TFDS's `incomplete.*`, the manifest builder's `.decoded-*`)."""
    return os.path.join(builder.data_dir_root, builder.name, builder.builder_config.name)


@contextlib.contextmanager
def preparing(builder):
    """Holds `config_dir/.lock` (an OS file lock, released if the process dies): a second process
    preparing the same dataset waits here, then finds it prepared. Inside, the leftovers of an
    interrupted preparation (killed while decoding or writing) are removed: no other preparation
    of this config can be running."""
    folder = config_dir(builder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks (some NFS, Lustre without flock)
            print(f"Warning: {folder}: no file lock ({e}); preparing without one", flush=True)
        try:
            for pattern in ("incomplete.*", ".decoded-*"):
                for leftover in glob.glob(os.path.join(folder, pattern)):
                    shutil.rmtree(leftover, ignore_errors=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
