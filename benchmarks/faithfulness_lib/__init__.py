"""Helpers of benchmarks/faithfulness.py: set-ups, batched retraining, peers, turn-over variants, report."""
