"""The manual: the MkDocs site builds with ``--strict``, and every Python example in README.md
and docs/ runs as written, from an empty directory outside the repository.

Examples run as separate scripts (``python -W error::FutureWarning``) with the installed package,
so a repository-relative path (``blip_ase/assets/...``) or a deprecated call fails here before a
user meets it. A block that cannot run (a download, a GPU) carries ``<!-- not-run: reason -->`` on
the line before its fence; only such blocks are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SETUP_COMMANDS = (
    "pip install torch==2.13.0 && pip install -e . && blip md --temperature-K 1200",
    'pip install torch==2.13.0 && pip install -e ".[test,dft]" && python -m pytest -q',
)
README_MAX_LINES = 150
MAX_NOT_RUN = 3  # blocks that are not run must stay rare
EXAMPLE_TIMEOUT_S = 120  # each example takes seconds; the limit only stops a hang
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block of a Markdown file."""

    path: Path
    index: int  # 0-based among the file's python blocks
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the reason given in a not-run marker, else None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.index}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of ``path`` (also indented ones, e.g. in lists), in order."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"(\s*)```python\s*", lines[i])
        if not fence:
            i += 1
            continue
        indent, start = fence.group(1), i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i].removeprefix(indent))
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: a ```python fence is never closed"
        marker = NOT_RUN.search(lines[start - 1]) if start > 0 else None
        blocks.append(Block(path, len(blocks), start + 1, "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return blocks


BLOCKS = [block for path in MARKDOWN for block in python_blocks(path)]


def test_a_not_run_marker_applies_to_the_next_python_block_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not-run: needs a GPU -->\n```python\nimport cuda_only\n```\n\n"
        "- in a list:\n\n    ```python\n    x = 1\n    ```\n"
    )
    first, second = python_blocks(page)
    assert (first.not_run, first.code, first.line) == ("needs a GPU", "import cuda_only\n", 2)
    assert (second.not_run, second.code, second.index) == (None, "x = 1\n", 1)


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def test_the_site_builds_in_strict_mode_with_api_pages_from_the_docstrings(tmp_path):
    done = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    calculator = (tmp_path / "site" / "reference" / "calculator" / "index.html").read_text()
    assert "max_batch_atoms" in calculator and "ammonia_model" in calculator  # rendered from docstrings
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()


def test_strict_mode_fails_on_a_link_to_a_missing_page_or_heading(tmp_path):
    """A copy of the site with two broken links: the build must fail and name both."""
    config = (ROOT / "mkdocs.yml").read_text()
    assert "paths: [.]" in config, "mkdocs.yml no longer sets mkdocstrings' paths: [.]; update this test"
    (tmp_path / "mkdocs.yml").write_text(config.replace("paths: [.]", f"paths: [{ROOT.as_posix()!r}]"))
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a") as fh:
        fh.write("\n[gone](no-such-page.md) and [nowhere](benchmarks.md#no-such-heading)\n")
    done = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no-such-page.md" in output and "no-such-heading" in output


def test_readme_is_short_and_holds_both_set_up_commands_verbatim():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    for command in SETUP_COMMANDS:
        assert command in text


def test_every_relative_link_of_the_readme_points_to_a_file_of_the_repository():
    """MkDocs checks the links of docs/; README.md is outside the site, so it is checked here."""
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    relative = [link.split("#")[0] for link in links if "://" not in link and not link.startswith("#")]
    assert len(relative) >= 10  # the README is mostly an index into docs/
    assert [link for link in relative if not (ROOT / link).is_file()] == []


def test_the_docs_and_readme_have_python_examples_and_few_are_not_run():
    by_file = {block.path.name for block in BLOCKS}
    assert {"README.md", "getting-started.md", "python-api.md", "md.md"} <= by_file
    not_run = [block.id for block in BLOCKS if block.not_run is not None]
    assert len(not_run) <= MAX_NOT_RUN, f"too many examples are not run: {not_run}"
    assert all(block.not_run for block in BLOCKS if block.not_run is not None), "a not-run marker needs a reason"


def test_every_benchmark_table_has_its_date_and_command_beside_it():
    """Each section of the benchmark pages that holds a table says when and with what it was measured."""
    text = "\n".join((ROOT / "docs" / page).read_text() for page in ("benchmarks.md", "uncertainty.md"))
    sections = re.split(r"^#{2,3} ", text, flags=re.MULTILINE)[1:]
    with_tables = [s for s in sections if re.search(r"^\|[-|: ]+\|$", s, re.MULTILINE)]
    assert len(with_tables) >= 10
    for section in with_tables:
        title = section.splitlines()[0]
        assert re.search(r"Recorded \d{4}-\d\d-\d\d", section), f"section {title!r} has no date"
        assert re.search(r"python md_scripts/|blip (eval|learn|train|md)", section), f"section {title!r} has no command"


def run_example(block: Block, directory: Path) -> subprocess.CompletedProcess:
    """Run ``block`` as a script in ``directory`` (empty, outside the repository)."""
    assert not directory.resolve().is_relative_to(ROOT)
    script = directory / "example.py"
    script.write_text(block.code)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-W", "error::FutureWarning", script.name]
    return subprocess.run(
        cmd, cwd=directory, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, env=env, check=False
    )


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The selected examples, run concurrently (one process per core): each one mostly waits for
    its own imports, and one after another they take about a minute on two cores."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [
        item.callspec.params["block"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_the_python_example_runs_from_an_empty_directory"
    ]
    todo = [block for block in selected if block.not_run is None]
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        runs = pool.map(lambda block: run_example(block, tmp_path_factory.mktemp("example")), todo)
        return {block.id: done for block, done in zip(todo, runs)}


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_the_python_example_runs_from_an_empty_directory(block, example_runs):
    """Also without FutureWarnings (``-W error::FutureWarning``): deprecated calls fail here."""
    if block.not_run is not None:
        pytest.skip(f"marked not-run: {block.not_run}")
    done = example_runs[block.id]
    where = f"{block.path.relative_to(ROOT)}, block {block.index} (line {block.line})"
    assert done.returncode == 0, f"{where} failed:\n{done.stdout}\n{done.stderr}"
