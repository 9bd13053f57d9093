"""Input-pipeline throughput: prints examples/s of the training loader (and one evaluation pass).

    python -m mmjax.data.benchmark [--dataset=synthetic_patients] [--batch_size=64] [--workers=2]
    python -m mmjax.data.benchmark --manifest=M --schema=S      # a manifest dataset (prepared if needed)
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from mmjax.data import pipeline

_DATASET = flags.DEFINE_string("dataset", "synthetic_patients", "TFDS name, optionally with /config.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $MMJAX_DATA_DIR or ~/tensorflow_datasets).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Training batches to time (after 5 warm-up batches).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Grain worker processes; each value is timed.")
_AUGMENT = flags.DEFINE_bool("augment", True, "Train-time image augmentation.")
_MANIFEST = flags.DEFINE_string("manifest", None, "A manifest dataset instead of --dataset (with --schema).")
_SCHEMA = flags.DEFINE_string("schema", None, "The manifest's schema.")


def measure(builder, spec, batch_size, batches, workers, augment=True) -> dict:
    loader = pipeline.train_loader(builder, spec, batch_size, seed=0, augment=augment,
                                   worker_count=workers, shard_index=0, shard_count=1)
    it = iter(loader)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    train_rate = batches * batch_size / (time.perf_counter() - start)
    start, n = time.perf_counter(), 0
    for batch in pipeline.eval_batches(builder, spec, "validation", batch_size, shard_index=0, shard_count=1):
        n += int(batch["example_mask"].sum())
    eval_rate = n / (time.perf_counter() - start)
    return {"workers": workers, "train_examples_per_s": round(train_rate, 1),
            "eval_examples_per_s": round(eval_rate, 1)}


def main(argv):
    del argv
    if _MANIFEST.value:
        from mmjax.data.manifest import builder as manifest_builder

        builder = manifest_builder.load(_MANIFEST.value, _SCHEMA.value, _DATA_DIR.value)
    else:
        builder = pipeline.load_builder(_DATASET.value, _DATA_DIR.value)
    spec = pipeline.DatasetSpec.from_builder(builder)
    shapes = ", ".join(f"{m.name} ({m.kind}) {m.shape}" for m in spec.modalities if m.shape)
    print(f"{builder.name}/{builder.builder_config.name}: {shapes}; batch {_BATCH.value}, cpus {os.cpu_count()}")
    for w in _WORKERS.value:
        print(json.dumps(measure(builder, spec, _BATCH.value, _BATCHES.value, int(w), _AUGMENT.value)))


if __name__ == "__main__":
    app.run(main)
