"""The README and the docs/ pages run as written: every ```python block, and their links resolve.

The blocks of one page run in order in one fresh process (as a reader pastes them into one session), in an
empty folder, offline. A block that cannot run here (the real Hub, several GPUs) is marked on the line before
its fence with ``<!-- not-tested: reason -->``; those are counted and listed, never run silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_TESTED = re.compile(r"<!--\s*not-tested:\s*(.*?)\s*-->")
# Words about how the work was organised, not about the product (README, docs and the package).
ORGANISATIONAL = re.compile(r"(last|this) stop|issue [0-9]", re.IGNORECASE)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str
    skip_reason: str | None


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, with the not-tested reason written just above a fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.name}:{index + 1}: a code fence is never closed"
        before = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_TESTED.search(before)
        code = "\n".join(lines[index + 1 : end])
        found.append(Block(page, index + 2, match.group(1), code, reason.group(1) if reason else None))
        index = end + 1
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language == "python"]


def script(page_blocks: list[Block]) -> str:
    """A program that runs the blocks in order in one namespace; tracebacks name the page and its lines."""
    parts = ["import sys", "namespace = {'__name__': '__main__'}"]
    for block in page_blocks:
        padded = "\n" * (block.line - 1) + block.code  # line numbers of the page itself
        parts.append(f"exec(compile({padded!r}, {str(block.page.relative_to(ROOT))!r}, 'exec'), namespace)")
        parts.append(f"print('docs block ok: line {block.line}', file=sys.stderr)")
    return "\n".join(parts) + "\n"


RUNNABLE = [page for page in PAGES if any(b.skip_reason is None for b in python_blocks(page))]


def test_every_python_block_runs_or_says_why_not():
    skipped = [b for page in PAGES for b in python_blocks(page) if b.skip_reason is not None]
    for block in skipped:
        assert block.skip_reason.strip(), f"{block.page.name}:{block.line}: not-tested needs a reason"
        print(f"not run: {block.page.relative_to(ROOT)}:{block.line} ({block.skip_reason})")
    total = sum(len(python_blocks(page)) for page in PAGES)
    assert total - len(skipped) >= 10, "the docs should show runnable code, not only prose"
    assert len(skipped) <= 3, f"{len(skipped)} of {total} python blocks are not run: {skipped}"


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(page: Path, tmp_path: Path):
    runnable = [b for b in python_blocks(page) if b.skip_reason is None]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        MPLBACKEND="Agg",
    )
    (tmp_path / "run").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script(runnable)],
        cwd=tmp_path / "run",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    done = result.stderr.count("docs block ok")
    assert result.returncode == 0, (
        f"{page.name}: block {done + 1} of {len(runnable)} (line {runnable[min(done, len(runnable) - 1)].line})"
        f" failed:\n{result.stderr[-6000:]}"
    )
    assert done == len(runnable)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|<img src=\"([^\"]+)\"")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    text = page.read_text(encoding="utf-8")
    targets = [a or b for a, b in LINK.findall(text)]
    broken = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_commands_in_shell_blocks_exist():
    """Every script a ```bash block of the README or docs runs is in the repository."""
    named = {
        word
        for page in PAGES
        for b in blocks(page)
        if b.language == "bash"
        for word in re.findall(r"\b((?:recipes|benchmarks)/[\w/]+\.py)\b", b.code)
    }
    assert named, "the shell blocks should name the recipes they run"
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"shell blocks name missing scripts: {missing}"


def test_readme_keeps_the_install_main_and_test_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in (
        'pip install torch==2.13.0 && pip install -e ".[dev]"',
        "accelerate launch recipes/sst2.py",
        "python -m pytest",
    ):
        assert command in text, f"README.md lost the command {command!r}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move long-form material into docs/"


def test_no_words_about_how_the_work_was_organised():
    files = [*PAGES, *sorted((ROOT / "hf_turnover").rglob("*.py")), *sorted((ROOT / "model_cards").glob("*"))]
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        if path.is_file()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if ORGANISATIONAL.search(line)
    ]
    assert not hits, "\n".join(hits)
