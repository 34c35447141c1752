"""Offline text-classification data and metrics bundled with the package, with the Hub as the other path.

The bundled datasets are built by `recipes/data/build.py`; see `hf_turnover/resources/data/README.md` for their
source, license and citations. Every bundled split has the columns `instance_id` (0..n-1 within the split),
`sentence`, `label` (0 = negative, 1 = positive), `score` (mean human rating) and `source_id`; the Amazon splits
add `review_id`.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from datasets import DatasetDict, load_dataset

if TYPE_CHECKING:
    import evaluate

RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
BUNDLED_DATA_DIR = RESOURCES_DIR / "data"
BUNDLED_METRICS_DIR = RESOURCES_DIR / "metrics"
BUNDLED_DATASETS = ("rotten_tomatoes", "amazon_electronics")
DEFAULT_DATASET = "rotten_tomatoes"


def load_bundled_dataset(name: str) -> DatasetDict:
    """Load a bundled dataset (`"rotten_tomatoes"`: train/validation/test, `"amazon_electronics"`:
    validation/test) from the parquet files inside the package; works offline."""
    if name not in BUNDLED_DATASETS:
        raise ValueError(f"Unknown bundled dataset {name!r}; valid names are {list(BUNDLED_DATASETS)}.")
    paths = [BUNDLED_DATA_DIR / name / f"{split}.parquet" for split in ("train", "validation", "test")]
    data_files = {path.stem: str(path) for path in paths if path.is_file()}
    if not data_files:
        raise FileNotFoundError(f"No parquet files in {BUNDLED_DATA_DIR / name}; run recipes/data/build.py.")
    loaded = load_dataset("parquet", data_files=data_files)
    return DatasetDict({split: loaded[split] for split in data_files})  # `load_dataset` reorders the splits


def load_text_classification(dataset_name: str | None, dataset_config_name: str | None = None) -> DatasetDict:
    """Load a sentence-classification dataset: a bundled one when `dataset_name` is None (the default,
    `"rotten_tomatoes"`) or a bundled name, otherwise `datasets.load_dataset(dataset_name, dataset_config_name)`
    from the Hub (e.g. `"glue", "sst2"`, whose text column is also `sentence`).

    The bundled names shadow Hub datasets of the same name: load the Hub's Rotten Tomatoes (column `text`) as
    `"cornell-movie-review-data/rotten_tomatoes"`.
    """
    if dataset_name is None or dataset_name in BUNDLED_DATASETS:
        return load_bundled_dataset(dataset_name or DEFAULT_DATASET)
    return load_dataset(dataset_name, dataset_config_name)


def load_metric(name: str = "accuracy") -> "evaluate.EvaluationModule":
    """Load a metric module bundled in `hf_turnover/resources/metrics/<name>/<name>.py` with `evaluate.load`,
    which works offline (`evaluate.load("accuracy")` fetches the module from the Hub)."""
    import evaluate  # Only the recipes need `evaluate`; importing this module must not.

    valid = sorted(
        path.name for path in BUNDLED_METRICS_DIR.iterdir() if (path / f"{path.name}.py").is_file()
    )
    if name not in valid:
        raise ValueError(f"Unknown bundled metric {name!r}; valid names are {valid}.")
    return evaluate.load(str(BUNDLED_METRICS_DIR / name))
