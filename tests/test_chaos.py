"""The long chaos run: `bench/chaos.py` with every scenario at full size on a stack of its own (three workers, dozens
of jobs). Deselected by default (`addopts`), run with `pytest -m chaos`; its table goes in a closing note. The short
form of each scenario runs with the suite, in tests/test_faults.py (its docstring says which test is which)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, python_env

SCENARIOS = ["worker-kill", "db-outage", "broker-restart", "api-kill", "redelivery", "sigterm-group"]


@pytest.mark.chaos
def test_chaos_every_job_succeeds_once_and_nothing_is_left_behind():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py")],
        capture_output=True,
        text=True,
        timeout=4 * 3600,
        env=python_env(),
        cwd=ROOT,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["scenario"] for r in rows] == SCENARIOS, out.stdout + out.stderr[-3000:]
    for r in rows:
        assert r["succeeded"] == r["submitted"] > 0, r
        assert r["most_at_once"] == 1, r
        assert r["stuck"] == r["orphans"] == r["leftover_folders"] == 0, r
    sigterm = next(r for r in rows if r["scenario"] == "sigterm-group")
    assert sigterm["retrained_steps"] == 0, "a SIGTERMed attempt hands back from the step it stopped at"
    print(out.stdout)  # the table, for the closing note (pytest -s)
    assert out.returncode == 0, out.stdout
