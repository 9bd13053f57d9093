"""Benchmarks: the train step (`python -m mmjax.benchmarks.train_step`) and the input pipeline
(`python -m mmjax.benchmarks.input_pipeline`)."""
