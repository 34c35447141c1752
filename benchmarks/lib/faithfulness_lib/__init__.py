"""Helpers of benchmarks/faithfulness/faithfulness.py: set-ups, batched retraining, peers, turn-over variants, report."""
