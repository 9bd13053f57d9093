"""Evaluation beyond per-batch metrics: reference bounds and reports."""
