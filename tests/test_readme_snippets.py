"""Every ```python block of the README runs as written, each in a fresh interpreter (a block
registers rules and defines operators: it must not leak into the other tests), from an empty
working directory. A block that cannot run on its own is marked in the README by an HTML comment
on the line before it, `<!-- not-run: the reason -->`; it is reported as skipped with its
reason, and a marker that precedes no python block, or gives no reason, is an error."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# (FXSURGERY_README: another file to check the same way, e.g. a README edit before it lands)
README = Path(os.environ.get("FXSURGERY_README") or Path(__file__).resolve().parent.parent / "README.md")
MARKER = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")


def blocks(text: str) -> list[dict]:
    """Each fenced block: its language, first line number, code, the heading it sits under and
    the not-run reason of a marker on the line before it (blank lines between are allowed)."""
    out, lines, i, heading = [], text.splitlines(), 0, "top"
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^```\s*(\S*)\s*$", line)
        if fence:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            j = start - 2
            while j >= 0 and not lines[j].strip():
                j -= 1
            marker = MARKER.match(lines[j]) if j >= 0 else None
            out.append({"lang": fence.group(1), "line": start + 1, "code": "\n".join(body) + "\n",
                        "heading": heading, "not_run": marker.group(1) if marker else None,
                        "marker_line": j + 1 if marker else None})
        i += 1
    return out


ALL = blocks(README.read_text())
PYTHON = [b for b in ALL if b["lang"] == "python"]


def test_the_readme_has_python_blocks_and_not_every_one_is_skipped():
    assert PYTHON, "no ```python block found in README.md"
    assert any(b["not_run"] is None for b in PYTHON), "every python block of README.md is marked not-run"


def test_not_run_markers_precede_python_blocks_and_give_a_reason():
    text = README.read_text().splitlines()
    marked = {b["marker_line"] for b in PYTHON if b["not_run"] is not None}
    for k, line in enumerate(text, 1):
        m = MARKER.match(line)
        if m:
            assert k in marked, f"README.md:{k}: a not-run marker that precedes no ```python block"
            assert m.group(1), f"README.md:{k}: a not-run marker without a reason"


@pytest.mark.parametrize("block", PYTHON, ids=[f"line{b['line']}-{b['heading'][:30]}" for b in PYTHON])
def test_a_python_block_of_the_readme_runs_as_written(block, tmp_path):
    if block["not_run"] is not None:
        pytest.skip(f"README.md:{block['line']} is marked not-run: {block['not_run']}")
    script = tmp_path / "snippet.py"
    script.write_text(block["code"])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (f"README.md:{block['line']} (under '{block['heading']}') fails:\n"
                                  f"{done.stderr[-3000:]}")
