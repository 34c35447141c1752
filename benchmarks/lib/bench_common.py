"""What the benchmark scripts share. They import it by its bare name: Python puts the script's folder on sys.path."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import HfArgumentParser

from hf_turnover.atomic import atomic_write_text


def parse_benchmark_arguments(argument_type: type, argv: list[str] | None, smoke: dict[str, Any]) -> Any:
    """The driver's arguments from ``argv`` (``None``: ``sys.argv[1:]``); ``--smoke true`` applies the ``smoke``
    settings. Sets torch's thread count from ``--threads``."""
    (args,) = HfArgumentParser(argument_type).parse_args_into_dataclasses(args=argv)
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    return args


def print_and_save_json(results: dict[str, Any], path: str | os.PathLike | None) -> None:
    """Print ``results`` as indented JSON and, given a ``path``, write the same text there atomically."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        atomic_write_text(path, text + "\n")
