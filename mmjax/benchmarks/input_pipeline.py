"""Input-pipeline throughput: prints examples/s of the training loader (and one evaluation pass).

    python -m mmjax.benchmarks.input_pipeline [--dataset=synthetic_patients] [--batch_size=64] [--workers=2]
    python -m mmjax.benchmarks.input_pipeline --manifest=M --schema=S      # a manifest dataset (prepared if needed)
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from mmjax.console import run
from mmjax.data import pipeline, sources

FLAGS = flags.FLAGS


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


def define_flags() -> None:
    """The command's flags, defined when it runs (not at import, so modules with flags of the same
    name can be imported together)."""
    sources.define_dataset_flags()
    flags.adopt_module_key_flags(sources)  # listed in --helpshort with the command's own
    flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
    flags.DEFINE_integer("batches", 200, "Training batches to time (after 5 warm-up batches).")
    flags.DEFINE_list("workers", ["0", "2"], "Grain worker processes; each value is timed.")
    flags.DEFINE_bool("augment", True, "Train-time image augmentation.")
    flags.DEFINE_string("manifest", None, "A manifest dataset instead of --dataset (with --schema).")
    flags.DEFINE_string("schema", None, "The manifest's schema.")


def main(argv):
    del argv
    if FLAGS.manifest:
        from mmjax.data.manifest import builder as manifest_builder

        builder = manifest_builder.load(FLAGS.manifest, FLAGS.schema, FLAGS.data_dir)
    else:
        builder = sources.load_builder(FLAGS.dataset, FLAGS.data_dir)
    spec = pipeline.DatasetSpec.from_builder(builder)
    shapes = ", ".join(f"{m.name} ({m.kind}) {m.shape}" for m in spec.modalities if m.shape)
    print(f"{builder.name}/{builder.builder_config.name}: {shapes}; batch {FLAGS.batch_size}, cpus {os.cpu_count()}")
    for w in FLAGS.workers:
        print(json.dumps(measure(builder, spec, FLAGS.batch_size, FLAGS.batches, int(w), FLAGS.augment)))


if __name__ == "__main__":
    define_flags()
    run(main)
