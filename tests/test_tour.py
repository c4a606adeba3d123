"""docs/tour.md stays true to the code: every link to code names a function and points inside it at no more
than 40 lines, every picture it shows exists, and tools.tour draws them (slow: the lab model, PLMS-50 four times)."""
import re
from pathlib import Path

import pytest
from PIL import Image

from tools.tour import LINK, link_lines

ROOT = Path(__file__).resolve().parent.parent
TOUR = (ROOT / "docs" / "tour.md").read_text()
LINKS = LINK.findall(TOUR)
PICTURES = re.findall(r"\]\((tour/[\w.-]+\.png)\)", TOUR)


def test_every_code_link_shows_its_function_in_at_most_40_lines():
    """After the code moves, `python -m tools.tour --links` rewrites the links."""
    assert len(LINKS) >= 15
    for name, path, first, last in LINKS:
        assert link_lines(ROOT / path, name) == (int(first), int(last)), (name, path)
        assert int(last) - int(first) < 40, (name, path)


def test_every_picture_exists():
    assert len(PICTURES) == 7 and all((ROOT / "docs" / p).exists() for p in PICTURES)


@pytest.mark.slow
def test_the_command_draws_the_pictures(tmp_path):
    from tools import tour
    tour.main(["--out", str(tmp_path), "--threads", "2"])
    for picture in PICTURES:
        assert Image.open(tmp_path / Path(picture).name).size == Image.open(ROOT / "docs" / picture).size
