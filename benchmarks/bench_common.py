"""What the benchmark scripts share. They import it by its bare name: Python puts the script's folder on sys.path."""

from __future__ import annotations

import json
import os
from typing import Any

from hf_turnover.atomic import atomic_write_text


def print_and_save_json(results: dict[str, Any], path: str | os.PathLike | None) -> None:
    """Print ``results`` as indented JSON and, given a ``path``, write the same text there atomically."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        atomic_write_text(path, text + "\n")
