"""A big upload streams through validation: the API's memory stays bounded (bench/upload_memory.py; the 1 GiB
run is in issue 10's closing note)."""

import sys

from tests.conftest import ROOT


def test_a_big_upload_leaves_the_apis_memory_bounded():
    sys.path.insert(0, str(ROOT / "bench"))
    from upload_memory import measure

    result = measure(megabytes=128)
    assert result["rows"] > 40_000
    assert result["above_idle_mb"] < 100, result
