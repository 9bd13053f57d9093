"""The manifest dataset: a TFDS builder generated from a CSV/TSV/JSONL/Parquet manifest and a YAML schema.

    python -m mmjax.data.manifest --manifest=M --schema=S [--data_dir=D]   # validate, prepare, summarize

`schema` (the YAML format), `table` (cells -> splits, labels, values), `readers` (files ->
arrays), `prepare` (parallel decoding, bad rows, statistics fitted on the training split),
`builder` (the TFDS builder and its reuse/rebuild logic), `summary` (what the command prints).
"""
