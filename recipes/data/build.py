"""Build the bundled sentence-classification data shipped in `hf_turnover/resources/data/`.

Command (from the repository root; needs the package registry once, to download the sdist):

    python recipes/data/build.py

or, with the sdist already downloaded:

    python recipes/data/build.py --sdist /path/to/vaderSentiment-3.3.2.tar.gz

Source: the vaderSentiment 3.3.2 sdist from PyPI (MIT), file `additional_resources/hutto_ICWSM_2014.tar.gz`,
which holds the human-rated sentences of Hutto & Gilbert (2014) as tab-separated `id<TAB>mean rating<TAB>text`.

- `rotten_tomatoes/{train,validation,test}.parquet`: the movie review sentences of Pang & Lee (2005), the
  sentences SST-2 was built from. Split 80/10/10 by a seeded permutation.
- `amazon_electronics/{validation,test}.parquet`: the product review sentences of Hu & Liu (2004). Split by
  review: whole reviews go to validation until it holds exactly `--amazon_validation_sentences` sentences.

Every split is shuffled once, seeded (the source files are ordered by label and by review), so its first n rows
are a fair sample: `select(range(n))` gives both labels in about the split's proportion.

Label rule: 1 (positive) if the mean rating is > 0, 0 (negative) if < 0; sentences rated exactly 0 are dropped.
The output is deterministic: running the script twice writes byte-identical files. Row counts, label balance,
license and citations: `hf_turnover/resources/data/README.md`.
"""

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import ClassLabel, Dataset, Features, Value

SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
# The sha256 PyPI publishes for this file; PyPI files are immutable, so a mismatch means a different file.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
AMAZON_FILE = "amazonReviewSnippets_GroundTruth.txt"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[2] / "hf_turnover" / "resources" / "data"

BASE_FEATURES = {
    "instance_id": Value("int64"),
    "sentence": Value("string"),
    "label": ClassLabel(names=["negative", "positive"]),
    "score": Value("float64"),
    "source_id": Value("string"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sdist", type=Path, default=None, help=f"A downloaded {SDIST_NAME}.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="Where to write parquet.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of both splits.")
    parser.add_argument(
        "--amazon_validation_sentences", type=int, default=200, help="Size of Amazon validation."
    )
    return parser.parse_args()


def download_sdist(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["vaderSentiment==3.3.2", "-d", str(directory)]
    subprocess.run(command, check=True)
    return directory / SDIST_NAME


def read_snippet_files(sdist: Path) -> dict[str, bytes]:
    """Return the raw bytes of the movie and Amazon ground-truth files, found inside the nested tarball."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_NAME} on PyPI).")
    with tarfile.open(sdist) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith(INNER_TAR))
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        members = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
        return {name: inner.extractfile(members[name]).read() for name in (MOVIE_FILE, AMAZON_FILE)}


def parse_rows(raw: bytes) -> list[dict]:
    """Parse `id<TAB>score<TAB>text` lines; the text may itself hold tabs, so split on the first two only.

    The files are CRLF-terminated and, although described as latin-1, valid UTF-8: decoding them
    as latin-1 turns e.g. a right single quote into mojibake, so they are decoded as UTF-8 (strictly).
    """
    rows = []
    for line in raw.decode("utf-8").split("\n"):
        line = line.rstrip("\r")
        if not line:
            continue
        source_id, score, text = line.split("\t", 2)
        score = float(score)
        if score != 0:
            rows.append(
                {"sentence": text.strip(), "label": int(score > 0), "score": score, "source_id": source_id}
            )
    return rows


def to_dataset(rows: list[dict], extra_features: dict | None = None) -> Dataset:
    features = Features({**BASE_FEATURES, **(extra_features or {})})
    columns = {name: [row[name] for row in rows] for name in features if name != "instance_id"}
    return Dataset.from_dict({"instance_id": list(range(len(rows))), **columns}, features=features)


def split_rotten_tomatoes(rows: list[dict], seed: int) -> dict[str, Dataset]:
    """80/10/10 by a seeded permutation; each split's rows come in the permutation's (random) order and get
    0-based instance ids."""
    permutation = np.random.default_rng(seed).permutation(len(rows))
    n_held_out = round(0.1 * len(rows))
    parts = {
        "train": permutation[2 * n_held_out :],
        "validation": permutation[:n_held_out],
        "test": permutation[n_held_out : 2 * n_held_out],
    }
    return {split: to_dataset([rows[i] for i in index]) for split, index in parts.items()}


def split_amazon(rows: list[dict], seed: int, validation_sentences: int) -> dict[str, Dataset]:
    """Split by review: walk the reviews in a seeded order and put a whole review in validation whenever it
    still fits, until validation holds exactly `validation_sentences` sentences; the rest is test."""
    for row in rows:
        row["review_id"] = row["source_id"].split("_", 1)[0]
    review_ids = sorted({row["review_id"] for row in rows}, key=int)
    sizes = {review: sum(row["review_id"] == review for row in rows) for review in review_ids}
    validation_reviews, total = set(), 0
    for i in np.random.default_rng(seed).permutation(len(review_ids)):
        review = review_ids[i]
        if total + sizes[review] <= validation_sentences:
            validation_reviews.add(review)
            total += sizes[review]
        if total == validation_sentences:
            break
    if total != validation_sentences:
        raise ValueError(f"Could not fill validation with whole reviews: {total} != {validation_sentences}.")
    splits = {
        "validation": [r for r in rows if r["review_id"] in validation_reviews],
        "test": [r for r in rows if r["review_id"] not in validation_reviews],
    }
    # Shuffle the sentences of each split (seeded; a separate stream, so the review split above is unchanged).
    shuffle = np.random.default_rng([seed, 1])
    extra = {"review_id": Value("string")}
    return {
        name: to_dataset([split_rows[i] for i in shuffle.permutation(len(split_rows))], extra)
        for name, split_rows in splits.items()
    }


def write(splits: dict[str, Dataset], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, dataset in splits.items():
        path = directory / f"{split}.parquet"
        # `Dataset.to_parquet` always uses snappy; zstd level 19 halves the size of the files the package ships.
        # The table's schema metadata carries the `datasets` features (the ClassLabel names included).
        pq.write_table(dataset.data.table, path, compression="zstd", compression_level=19)
        positive = sum(dataset["label"])
        print(
            f"{directory.name}/{split}: {len(dataset)} rows, {positive} positive, "
            f"{len(dataset) - positive} negative ({positive / len(dataset):.1%} positive), "
            f"{path.stat().st_size / 1024:.0f} KiB"
        )
        if "review_id" in dataset.column_names:
            print(f"  {len(set(dataset['review_id']))} reviews")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist if args.sdist is not None else download_sdist(Path(tmp))
        raw = read_snippet_files(sdist)
    movie, amazon = parse_rows(raw[MOVIE_FILE]), parse_rows(raw[AMAZON_FILE])
    write(split_rotten_tomatoes(movie, args.seed), args.output_dir / "rotten_tomatoes")
    write(
        split_amazon(amazon, args.seed, args.amazon_validation_sentences),
        args.output_dir / "amazon_electronics",
    )


if __name__ == "__main__":
    main()
