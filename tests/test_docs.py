"""The pages a reader follows say what the files hold: README's "How to read a script" line numbers point at the
regions and loop blocks they name, and every relative link in README.md, docs/ and results/ resolves."""

import re

import pytest

from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "results").glob("*/README.md"))]
REGION_STARTS = {  # the line each region of the README's table starts at: its marker
    "docstring": r'^"""',
    "`Args`": r"^@dataclass",
    "`ALGO LOGIC`": r"^# =+ ALGO LOGIC",
    "`RLHF CORE`": r"^# =+ RLHF CORE",
    "`MAIN`": r"^# =+ MAIN:",
    "`TRY NOT TO MODIFY`": r"^# =+ TRY NOT TO MODIFY",
    '`if __name__ == "__main__":`': r'^if __name__ == "__main__":',
}


def how_to_read():
    text = (REPO / "README.md").read_text()
    return text[text.index("## How to read a script") :].split("\n## ")[0]


def test_the_regions_table_gives_each_regions_first_and_last_line():
    section = how_to_read()
    header = next(line for line in section.splitlines() if line.startswith("| region |"))
    scripts = re.findall(r"`(\w+_rlhf(?:_multigpu)?\.py)`", header)
    assert scripts, header
    rows = [
        line for line in section.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() in REGION_STARTS
    ]
    assert len(rows) == len(REGION_STARTS)
    for column, script in enumerate(scripts):
        lines = (REPO / script).read_text().splitlines()
        ranges = [row.split("|")[-len(scripts) - 1 + column].strip() for row in rows]
        starts = [int(r.split("-")[0]) for r in ranges]
        for (name, pattern), start in zip(REGION_STARTS.items(), starts, strict=True):
            found = next(i for i, line in enumerate(lines, 1) if re.search(pattern, line))
            assert start == found, f"{script}: the README puts {name} at line {start}, it starts at {found}"
        assert int(ranges[-1].split("-")[1]) == len(lines), f"{script} has {len(lines)} lines"


def test_each_loop_block_row_points_at_its_block():
    section = how_to_read()
    tables = re.findall(r"\*\*\w+\*\* \(`(\w+_rlhf\.py)`.*?\n\n(\|.*?)(?:\n\n|\Z)", section, re.S)
    assert len(tables) == 3
    grpo = (REPO / "docs" / "grpo.md").read_text()  # GRPO's loop table lives on its own page
    tables += re.findall(r"\*\*\w+\*\* \(`(\w+_rlhf\.py)`.*?\n\n(\|.*?)(?:\n\n|\Z)", grpo, re.S)
    assert [script for script, _ in tables][3:] == ["grpo_rlhf.py"]
    for script, table in tables:
        lines = (REPO / script).read_text().splitlines()
        for row in table.splitlines()[2:]:
            cells = [c.strip() for c in row.split("|")[1:-1]]
            first = int(cells[1].split("-")[0])
            for block in re.findall(r"`(# [A-Z][A-Z ]+|for update in)", cells[0])[:1]:
                assert block in lines[first - 1], f"{script} line {first} is not {block}: {lines[first - 1]!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(REPO)} links to {target}, which does not exist"
