"""docs/tour.md stays true to the code: every link to code names a function and points inside it at no more
than 40 lines, every picture it shows exists, and tools.tour draws them (slow: the lab model, PLMS-50 four times)."""
import ast
import re
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TOUR = (ROOT / "docs" / "tour.md").read_text()
LINKS = re.findall(r"\[`(?:[\w/.]+`: `)?([\w.]+)`\]\(\.\./([\w/.]+)#L(\d+)-L(\d+)\)", TOUR)
PICTURES = re.findall(r"\]\((tour/[\w.-]+\.png)\)", TOUR)


def span(path, name):
    """(first, last) line of the def `name` (dotted: Class.method, outer.inner) in `path`."""
    nodes = ast.parse((ROOT / path).read_text()).body
    for part in name.split("."):
        node = next(n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        nodes = node.body
    return node.lineno, node.end_lineno


def test_every_code_link_points_inside_its_function_at_most_40_lines():
    assert len(LINKS) >= 15
    for name, path, first, last in LINKS:
        first, last = int(first), int(last)
        start, end = span(path, name)
        assert start <= first <= last <= end and last - first < 40, (name, path, first, last, start, end)


def test_every_picture_exists():
    assert len(PICTURES) == 7 and all((ROOT / "docs" / p).exists() for p in PICTURES)


@pytest.mark.slow
def test_the_command_draws_the_pictures(tmp_path):
    from tools import tour
    tour.main(["--out", str(tmp_path), "--threads", "2"])
    for picture in PICTURES:
        assert Image.open(tmp_path / Path(picture).name).size == Image.open(ROOT / "docs" / picture).size
