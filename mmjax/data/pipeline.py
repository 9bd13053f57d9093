"""The Grain input pipeline over `tfds.data_source`: deterministic, sharded, checkpointable.

    builder = sources.load_builder('synthetic_patients', data_dir=D)  # prepares it if needed
    spec = DatasetSpec.from_builder(builder)                          # modalities, tasks, statistics
    train = train_loader(builder, spec, batch_size=64, seed=0)       # infinite, shuffled
    it = iter(train); batch = next(it); state = it.get_state()       # ... it.set_state(state)
    for batch in eval_batches(builder, spec, 'test', batch_size=64):  # one pass, padded
        ...

Batches follow the contract in `mmjax/batch.py`; `modalities` picks some of the dataset's
modalities by name (default: all), `tasks` some of its tasks. `batch_size` is per process; each JAX
process (`jax.process_index()` of `jax.process_count()`) reads only its own rows:

- training: one global order of examples (shuffled by the seed alone), cut into global batches of
  `batch_size * process_count` rows; a process takes its block of rows of each. The random ops are
  keyed by an example's (or a batch's) global position, so the global batches, augmentation
  included, are the same on any number of processes, and batch k starts at `start_batch=k`: the
  training step is the whole position of the data, and a run resumes on another process or
  worker count exactly where it stopped.
- evaluation: a contiguous block of the split per process, so that the rows gathered from every
  process (`Predictor.collect`) are in the split's order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from mmjax.batch import TaskSpec
from mmjax.data import transforms as T
from mmjax.data.spec import DatasetSpec
from mmjax.data.tokenizer import WordPieceTokenizer

__all__ = ["DatasetSpec", "train_loader", "eval_batches", "preprocess_ops",
           "pad_batch", "num_eval_batches"]

# One reader thread: more threads only contend for the GIL with the transforms (measured on 2 cores:
# 980 examples/s with 1 thread, 790 with 2, 650 with 4).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=128)
# Batches read ahead: up to 128 (on 2 cores the default run's loop was ~6% faster with 128 than with 16),
# within this many bytes of batches in all (128 batches of `synthetic_patients/large` are 1.8 GB, and
# each worker process reads ahead on its own).
READ_AHEAD_MAX, READ_AHEAD_BYTES = 128, 256 * 2**20


def read_ahead(spec: DatasetSpec, modalities, batch_size: int, text_max_length: int, worker_count: int = 0) -> int:
    """How many batches a process (or each worker) reads ahead: `READ_AHEAD_MAX`, fewer where the
    batches are large (estimated from the modalities' shapes), at least 2."""
    per_example = 64  # labels and masks
    for m in spec.select_modalities(modalities):
        if m.kind in ("image", "signal"):
            per_example += 5 * math.prod(m.shape)  # float32 values, and a mask or a uint8 copy
        elif m.kind == "text":
            per_example += 5 * text_max_length
        else:
            per_example += 9 * (len(m.numeric) + len(m.categorical))
    fits = READ_AHEAD_BYTES // max(worker_count, 1) // (per_example * batch_size)
    return int(min(READ_AHEAD_MAX, max(2, fits)))


class CheckedSource:
    """A data source whose read errors name the split, record and files; `rows`: only those records of
    the split, in that order (`label_rows`: the labelled subset of a label-efficiency run)."""

    def __init__(self, builder, split: str, rows: Sequence[int] | None = None):
        try:
            self._source = builder.as_data_source(split)
        except Exception as e:  # noqa: BLE001  (re-raised with context)
            raise T.DataError(f"cannot open split {split!r} of {builder.name} in {builder.data_dir}: {e}") from e
        self._split = split
        self._where = builder.data_dir
        self._rows = None if rows is None else np.asarray(rows, np.int64)

    def __len__(self):
        return len(self._source) if self._rows is None else len(self._rows)

    def __getitem__(self, i):
        i = int(i if self._rows is None else self._rows[i])
        try:
            return self._source[i]
        except Exception as e:  # noqa: BLE001  (re-raised with context)
            raise T.DataError(f"split {self._split!r}, record {i} in {self._where}: cannot read or decode "
                              f"({type(e).__name__}: {e})") from e


def label_rows(count: int, fraction: float, seed: int) -> np.ndarray | None:
    """The records of a training split of `count` rows whose labels a label-efficiency run keeps
    (`data.label_fraction`): round(fraction * count) of them (at least 1), drawn without replacement
    with `seed`, sorted; None for fraction 1 (all). The draws are nested: a smaller fraction's rows are
    a subset of a larger one's for the same seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.label_fraction={fraction}: use a fraction in (0, 1]")
    if fraction == 1:
        return None
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[:max(1, round(fraction * count))])


def preprocess_ops(spec: DatasetSpec, modalities: Sequence[str] | None, tasks: Sequence[TaskSpec],
                   text_max_length: int = 96, spectrogram: bool = False, train: bool = False,
                   signal_windows: int = 0) -> list:
    """Per-example ops for the named modalities (None: all), read from each modality's spec: first
    those that give an example the same output every time (`fixed_ops`: checks, images, text, tables,
    labels), then the signals' (a random crop in training) and `Assemble`.
    `signal_windows` > 0 (evaluation only): that many windows per signal instead of the centre crop."""
    mods = spec.select_modalities(modalities)
    ops, signals = [T.CheckExample(mods, tuple(tasks))], []
    for m in mods:
        if m.kind == "image":
            ops.append(T.SelectImage(m))
        elif m.kind == "text":
            ops.append(T.TokenizeText(m, WordPieceTokenizer(m.vocab), text_max_length))
        elif m.kind == "tabular":
            ops.append(T.StandardizeTabular(m))
        else:
            signals.append(T.PrepareSignal(m, random_crop=train, windows=0 if train else signal_windows))
            if spectrogram:
                signals.append(T.Spectrogram(m.name))
    return ops + [T.CollectLabels(tuple(tasks))] + signals + [T.Assemble(tuple(m.name for m in mods))]


def fixed_ops(ops: list) -> int:
    """How many of `ops` (from `preprocess_ops`), from the first, give an example the same output every
    time: those before the first random op."""
    return next((i for i, op in enumerate(ops) if isinstance(op, grain.transforms.RandomMap)), len(ops))


def _nbytes(tree) -> int:
    """Bytes an example holds (arrays, text; 8 for anything else)."""
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, np.ndarray):
        return tree.nbytes
    return len(tree) if isinstance(tree, (bytes, str)) else 8


class _CachedSource(grain.MapDataset):
    """`source`'s examples through `ops` (deterministic ones), each computed once and kept in memory up to
    `limit_bytes` (counted as examples are kept; when the first example read, times the split's length,
    exceeds it, nothing is kept; either way a line says so): every epoch after the first then costs no
    reading, decoding, tokenizing or checking for the examples kept.
    A process (or worker) keeps the examples it reads; each read returns a shallow copy, so the ops that
    follow never change what is kept. The dataset's root (not `MapDataset.source` of it, whose per-read
    byte count for monitoring costs more than a kept example's read)."""

    def __init__(self, source, ops: list, limit_bytes: int, what: str):
        super().__init__()
        self._source, self._ops, self._limit, self._what = source, ops, limit_bytes, what
        self._kept: dict | None = {} if limit_bytes > 0 else None
        self._bytes, self._full = 0, False

    def __len__(self):
        return len(self._source)

    def __str__(self):
        return f"_CachedSource({self._what})"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        i = i % len(self._source)
        kept = self._kept
        if kept is not None and i in kept:
            return dict(kept[i])
        ex = self._source[i]
        for op in self._ops:
            ex = op.map(ex)
        if kept is not None and not self._full:
            size = _nbytes(ex)
            if not kept and size * len(self) > self._limit:  # the first example says the split cannot fit
                self._stop(f"~{size * len(self) / 2**20:.0f} MiB of examples exceed")
            elif self._bytes + size > self._limit:  # examples of other sizes did not fit after all
                self._stop(f"{len(kept)} examples kept ({self._bytes / 2**20:.0f} MiB) reached")
            else:
                kept[i] = ex
                self._bytes += size
        return dict(ex)

    def _stop(self, why: str) -> None:
        """Keeps nothing more (what is kept stays), and says so once."""
        print(f"{self._what}: {why} the limit of {self._limit / 2**20:.0f} MiB per process (data.cache_mib, "
              f"shared among the workers): the rest is read and prepared every epoch", flush=True)
        self._full = True
        if not self._kept:
            self._kept = None

    def __getstate__(self):  # a worker process starts with nothing kept
        return {**self.__dict__, "_kept": {} if self._kept is not None else None, "_bytes": 0, "_full": False}


def _apply(ds, ops, seed: int):
    for op in ops:
        ds = ds.random_map(op, seed=seed) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
    return ds


def _image_specs(spec: DatasetSpec, modalities) -> tuple:
    return tuple(m for m in spec.select_modalities(modalities) if m.kind == "image")


def _shard(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    return shard_index, shard_count


def _check_shard(shard_index, shard_count) -> None:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, {shard_count})")


def _records(source, shard_index, shard_count) -> grain.MapDataset:
    """This process's records of an evaluation pass: a contiguous block (disjoint, covering, in order)."""
    _check_shard(shard_index, shard_count)
    per_shard = math.ceil(len(source) / shard_count)
    return grain.MapDataset.source(source)[shard_index * per_shard:(shard_index + 1) * per_shard]


def train_loader(builder, spec: DatasetSpec, batch_size: int, seed: int, *, split: str = "train",
                 modalities: Sequence[str] | None = None, tasks: Sequence[TaskSpec] | None = None,
                 augment: bool = True, text_max_length: int = 96, spectrogram: bool = False,
                 shard_index: int | None = None, shard_count: int | None = None,
                 worker_count: int = 0, start_batch: int = 0, cache_mib: int = 2048,
                 rows: Sequence[int] | None = None) -> grain.IterDataset:
    """Infinite, shuffled (differently each epoch, deterministic for `seed`), full batches of
    `batch_size` rows: this process's rows of each global batch, from global batch `start_batch` on.

    The examples' deterministic preprocessing (reading, checks, images, text, tables, labels) is done
    once per example and kept in memory up to `cache_mib` MiB in all (shared among the workers; 0:
    never kept). `rows`: only those records of the split (`label_rows`).

    The batches depend on `seed`, the global batch size and `start_batch`, not on the process count
    or `worker_count` (> 0: preprocessing in that many processes). `iter(loader)` is also
    checkpointable by Grain (`it.get_state()` / `it.set_state(state)`).
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    _check_shard(shard_index, shard_count)
    ops = preprocess_ops(spec, modalities, tasks or spec.tasks, text_max_length, spectrogram, train=True)
    k = fixed_ops(ops)
    # each worker process keeps the examples it reads: the limit is shared among them
    source = _CachedSource(CheckedSource(builder, split, rows), ops[:k], cache_mib * 2**20 // max(worker_count, 1),
                           f"{builder.name} {split}")
    ds = source.shuffle(seed=seed).repeat()
    # per-example random ops (crops) seeded by the example's global position
    ds = _apply(ds, ops[k:], seed + 2)
    images = _image_specs(spec, modalities)
    # blocks of batch_size rows; block k * shard_count + shard_index is this process's part of global batch k
    ds = ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]
    if augment and images:  # seeded by the global batch; each process draws for all rows and keeps its own
        ds = ds.random_map(T.AugmentImages(specs=images, rows=(shard_index * batch_size, shard_count * batch_size)),
                           seed=seed + 1)
    else:
        ds = ds.map(T.ImageToFloat(images))
    ahead = read_ahead(spec, modalities, batch_size, text_max_length, worker_count)
    ds = ds[start_batch:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=ahead))
    return _with_workers(ds, worker_count)


def _with_workers(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """`ds` prepared in `worker_count` processes (0: in this one)."""
    if not worker_count:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside app.run use defaults
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_cpu_only_worker)


def _through(x, ops, rng: np.random.Generator):
    """`x` through grain `ops`, the random ones drawing from `rng`."""
    for op in ops:
        x = op.random_map(x, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(x)
    return x


class _SampledBatches:
    """Step s -> the batch of the training records `batches[s]` (a DP-SGD run's sampled rows), padded to
    `capacity` rows; the random ops and the augmentation drawn from (seed, s)."""

    def __init__(self, source, random_ops: list, batches, capacity: int, finish, seed: int):
        self._source, self._ops, self._batches = source, random_ops, batches
        self._capacity, self._finish, self._seed = capacity, finish, seed

    def __call__(self, step: int):
        import jax

        rng = np.random.default_rng([self._seed, int(step)])
        examples = [_through(self._source[int(i)], self._ops, rng) for i in self._batches[step]]
        if not examples:  # a Poisson draw of no row: a batch of padding, shaped on record 0
            x = jax.tree.map(np.zeros_like, _through(self._source[0], self._ops, rng))
            examples = [{**x, "example_mask": np.bool_(False)}]
        batch = pad_batch(jax.tree.map(lambda *xs: np.stack(xs), *examples), self._capacity)
        return _through(batch, [self._finish], rng)


def sampled_loader(builder, spec: DatasetSpec, batches: Sequence[np.ndarray], capacity: int, seed: int, *,
                   split: str = "train", modalities: Sequence[str] | None = None,
                   tasks: Sequence[TaskSpec] | None = None, augment: bool = True, text_max_length: int = 96,
                   spectrogram: bool = False, start_batch: int = 0, cache_mib: int = 2048,
                   rows: Sequence[int] | None = None, worker_count: int = 0) -> grain.IterDataset:
    """The batches of a DP-SGD run (`mmjax/training/privacy.py`): batch s holds the training records
    `batches[s]` (indices into the split, or into `rows`), drawn by the privacy plan, padded to `capacity`
    rows with `example_mask` False; from batch `start_batch` on. One process. The preprocessing is
    `train_loader`'s (deterministic ops cached, random crops and augmentation seeded by (seed, step))."""
    ops = preprocess_ops(spec, modalities, tasks or spec.tasks, text_max_length, spectrogram, train=True)
    k = fixed_ops(ops)
    source = _CachedSource(CheckedSource(builder, split, rows), ops[:k], cache_mib * 2**20 // max(worker_count, 1),
                           f"{builder.name} {split}")
    images = _image_specs(spec, modalities)
    finish = T.AugmentImages(specs=images, rows=(0, capacity)) if augment and images else T.ImageToFloat(images)
    ds = grain.MapDataset.range(start_batch, len(batches)).map(
        _SampledBatches(source, ops[k:], batches, capacity, finish, seed))
    ahead = read_ahead(spec, modalities, capacity, text_max_length, worker_count)
    return _with_workers(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=ahead)),
                         worker_count)


def _cpu_only_worker(worker_index: int, worker_count: int) -> None:
    """A Grain worker's JAX (the augmentation's warp) uses the host's CPU alone: it must not open an
    accelerator the training process holds (on a GPU host every worker would otherwise start CUDA)."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def num_eval_batches(num_records: int, batch_size: int, shard_count: int) -> int:
    """Batches each process yields in one evaluation pass: equal on every process."""
    return math.ceil(math.ceil(num_records / shard_count) / batch_size)


def eval_batches(builder, spec: DatasetSpec, split: str, batch_size: int, *,
                 modalities: Sequence[str] | None = None, tasks: Sequence[TaskSpec] | None = None,
                 text_max_length: int = 96, spectrogram: bool = False, signal_windows: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None) -> Iterator[dict]:
    """One pass over this process's shard of `split`, in order, no augmentation.

    A signal longer than its spec's length is centre-cropped, or with `signal_windows` = W cut into
    W evenly spaced windows (values [B, W, T, C]; `mmjax.training.step.make_eval_step` averages).

    Every batch has `batch_size` rows; rows past the end are padding with `example_mask` False,
    so each example counts exactly once. All processes yield the same number of batches.

    `builder` may instead be a list of examples in the builder's feature format (new patients'
    rows from `mmjax.data.manifest.prepare.prepare_new`, `example`); `split` is then ignored.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    source = builder if isinstance(builder, Sequence) else CheckedSource(builder, split)
    ops = preprocess_ops(spec, modalities, tasks or spec.tasks, text_max_length, spectrogram,
                         signal_windows=signal_windows)
    to_float = T.ImageToFloat(_image_specs(spec, modalities))  # per batch
    ds = _apply(_records(source, shard_index, shard_count), ops, seed=0)
    ds = ds.batch(batch_size, drop_remainder=False).map(to_float)
    total = num_eval_batches(len(source), batch_size, shard_count)
    template = None
    count = 0
    for batch in ds.to_iter_dataset(_READ_OPTIONS):
        template = batch
        count += 1
        yield pad_batch(batch, batch_size)
    if count < total:
        if template is None:  # this process's shard is empty: shape the padding on record 0
            template = _apply(grain.MapDataset.source(source)[:1], ops, seed=0).batch(1).map(to_float)[0]
        for _ in range(total - count):
            yield pad_batch(_empty_like(template), batch_size)


def _empty_like(batch):
    import jax

    return jax.tree.map(lambda x: np.zeros_like(x[:0]), batch)


def pad_batch(batch: dict, batch_size: int) -> dict:
    """Pads every array to `batch_size` rows with zeros (False for masks and presence)."""
    import jax

    def pad(x):
        missing = batch_size - x.shape[0]
        if missing < 0:
            raise ValueError(f"batch of {x.shape[0]} rows is larger than batch_size={batch_size}")
        return np.concatenate([x, np.zeros((missing,) + x.shape[1:], x.dtype)]) if missing else x

    return jax.tree.map(pad, batch)
