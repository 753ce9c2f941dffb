"""The short form of `bench/chaos.py` (every scenario, small): the full run is reported in issue 9's closing note."""

import json
import subprocess
import sys

from tests.conftest import ROOT, python_env


def test_chaos_short_every_job_succeeds_once_and_nothing_is_left_behind():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--short"],
        capture_output=True,
        text=True,
        timeout=1800,
        env=python_env(),
        cwd=ROOT,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["scenario"] for r in rows] == [
        "worker-kill",
        "db-outage",
        "broker-restart",
        "api-kill",
        "redelivery",
        "sigterm-group",
    ], out.stdout + out.stderr[-3000:]
    for r in rows:
        assert r["succeeded"] == r["submitted"] > 0, r
        assert r["most_at_once"] == 1, r
        assert r["stuck"] == r["orphans"] == r["leftover_folders"] == 0, r
    sigterm = next(r for r in rows if r["scenario"] == "sigterm-group")
    assert sigterm["retrained_steps"] == 0, "a SIGTERMed attempt hands back from the step it stopped at"
    assert out.returncode == 0, out.stdout
