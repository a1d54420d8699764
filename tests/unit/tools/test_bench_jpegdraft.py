"""``python -m tools.bench.jpegdraft``: the photo is a JPEG of the size asked for, and the table
compares the two settings on it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tools.bench.jpegdraft import main, photo_jpeg

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def test_the_photo_is_a_seeded_jpeg_of_the_size_asked_for() -> None:
    data = photo_jpeg(300, 200)
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.size, img.mode) == ("JPEG", (300, 200), "RGB")
    assert photo_jpeg(300, 200) == data != photo_jpeg(300, 200, seed=1)


def test_the_table_has_a_row_a_size_with_the_draft_smaller(capsys) -> None:
    assert main(["--sizes", "512x384,100x100", "--side", "32", "--seconds", "0.01"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["512x384", "100x100"]
    assert rows[0][2].strip() == "128x96" and rows[1][2].strip() == "100x100"  # 1/4; too small
    assert float(rows[1][6]) == 0.0  # not drafted: the same tensor
