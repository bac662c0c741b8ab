"""Every number in a documentation table comes from the results file the table cites.

A table cites its source by naming ``benchmarks/results/<file>`` (a link or a path) in the text between the
previous heading or table and the table, or in the three lines after it.  Each decimal number, and each integer of
three or more digits, in the table's cells must appear in one of the cited files, so a rerun that changes a result
cannot leave an old number in the docs.  On the pages that report measurements (benchmarks, evidence) every table
holding numbers must cite a source.
"""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MEASUREMENT_PAGES = {"docs/benchmarks.md", "docs/evidence.md"}
SOURCE = re.compile(r"benchmarks/results/([\w.\-]+\.(?:md|json|txt))")
# a number not glued to letters, dots or an "x" (patch sizes such as 40x56x40 are settings, not results)
NUMBER = re.compile(r"(?<![\w.])[-+−]?(\d+\.\d+|\d{3,})(?![\w.]|x\d)")


def documents():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def tables(text: str):
    """(table lines, the text that may cite its source) for each markdown table."""
    lines = text.splitlines()
    out, start_context, i = [], 0, 0
    while i < len(lines):
        if lines[i].startswith("#"):
            start_context = i
        if lines[i].lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            context = "\n".join(lines[start_context:i] + lines[j:j + 3])
            out.append((lines[i:j], context))
            start_context, i = j, j
            continue
        i += 1
    return out


def cell_numbers(table_lines):
    numbers = []
    for line in table_lines[2:]:  # skip the header and the |---| rule
        text = re.sub(r"`[^`]*`", "", line)  # code spans hold settings (`--features 8 16`), not results
        numbers += [m.group(1) for m in NUMBER.finditer(text)]
    return numbers


def missing_numbers(numbers, source_texts):
    """The numbers that appear in none of the source texts (as a whole number, not part of a longer one)."""
    tokens = set()
    for text in source_texts:
        tokens |= set(re.findall(r"\d+\.\d+|\d+", text))
    return [n for n in numbers if n not in tokens]


def cases():
    for doc in documents():
        rel = doc.relative_to(REPO).as_posix()
        for k, (table, context) in enumerate(tables(doc.read_text())):
            numbers = cell_numbers(table)
            if numbers:
                yield pytest.param(rel, table, context, numbers, id=f"{rel}:table{k + 1}")


@pytest.mark.parametrize("doc, table, context, numbers", list(cases()))
def test_table_numbers_appear_in_the_cited_results_file(doc, table, context, numbers):
    sources = sorted(set(SOURCE.findall(context)))
    if not sources:
        assert doc not in MEASUREMENT_PAGES, (f"{doc}: a table of numbers cites no benchmarks/results/ file:\n"
                                              + "\n".join(table[:3]))
        return
    texts = []
    for name in sources:
        path = RESULTS / name
        assert path.is_file(), f"{doc} cites {path}, which does not exist"
        texts.append(path.read_text())
    missing = missing_numbers(numbers, texts)
    assert not missing, f"{doc}: numbers not found in {sources}: {missing}\n" + "\n".join(table[:3])


def test_the_checker_catches_a_stale_number():
    """A number the results file does not hold is reported; a longer number does not stand in for it."""
    table = ["| a | b | c |", "|---|---|---|", "| x | 0.516 | `--patch 40` |", "| y | +0.999 [-0.05, 1234] | 40x56x40 |"]
    numbers = cell_numbers(table)
    assert numbers == ["0.516", "0.999", "0.05", "1234"]
    assert missing_numbers(numbers, ["0.516 0.0500 12345 -0.999"]) == ["0.05", "1234"]
    assert missing_numbers(numbers, ["0.516\n0.05 1234 0.999"]) == []


def test_measurement_pages_cite_their_sources():
    for page in MEASUREMENT_PAGES:
        text = (REPO / page).read_text()
        assert SOURCE.search(text), page
