"""A big upload streams through validation: the API's memory stays bounded (bench/upload_memory.py; the 1 GiB
run is in issue 10's closing note), and duplicate detection holds to its documented bytes per distinct row."""

import sys
import tracemalloc

from tests.conftest import ROOT
from training.fingerprints import ROW_BYTES, Fingerprints
from training.formats import check_lines


def test_a_big_upload_leaves_the_apis_memory_bounded():
    sys.path.insert(0, str(ROOT / "bench"))
    from upload_memory import measure

    result = measure(megabytes=128)
    assert result["rows"] > 40_000
    assert result["above_idle_mb"] < 100, result


def test_validation_keeps_a_few_bytes_per_distinct_row_and_still_names_the_first_line_of_a_duplicate():
    rows = 200_000
    lines = (b'{"prompt": "Q%d", "chosen": "A", "rejected": "B"}\n' % i for i in range(rows))
    tracemalloc.start()
    try:
        report, kept = check_lines(lines, "dpo", keep=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (report.rows, report.warning_count, kept) == (rows, 0, [])
    assert peak / rows < 2 * ROW_BYTES, f"{peak / rows:.1f} bytes per distinct row"

    again = [b'{"prompt": "Q%d", "chosen": "A", "rejected": "B"}\n' % (i % 70_000) for i in range(70_003)]
    report, _ = check_lines([b"\n", *again], "dpo", keep=False)
    assert report.warning_count == 3
    assert [(w.line, w.reason) for w in report.warnings] == [
        (70_002 + i, f"duplicate of line {2 + i}") for i in range(3)
    ]


def test_line_numbers_past_four_billion_are_kept_exactly():
    seen = Fingerprints()
    assert seen.first_line(1 << 63, 7) is None and seen.first_line(5, 1 << 33) is None
    assert (seen.first_line(5, 1 << 34), seen.first_line(1 << 63, 1 << 34)) == (1 << 33, 7)
