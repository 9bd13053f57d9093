"""Training: state, optimizer, the pure train step, parallelism, checkpoints, logging, the loop."""
