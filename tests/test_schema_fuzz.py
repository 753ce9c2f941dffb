"""schemathesis against a live API on PostgreSQL: every answer to generated requests (valid and invalid) is
documented in the OpenAPI document, in its declared shape, and none is a 5xx. A bounded budget here; the long
run (`SCHEMATHESIS_MAX_EXAMPLES=260`: 5,861 cases) is reported in the closing note of issue 9."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import create_pg_database, drop_pg_database

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance"
)
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


@pytest.fixture(scope="module")
def live_api(tmp_path_factory, broker_url, pg_template):
    from cli.stack import free_port, stop, wait_for_port
    from training.parent import die_with_parent

    url, name = create_pg_database(template=pg_template)
    port = free_port()
    env = dict(
        os.environ,
        PREFQ_DATA_DIR=str(tmp_path_factory.mktemp("fuzz")),
        PREFQ_DATABASE_URL=url,
        PREFQ_BROKER_URL=broker_url.rsplit("/", 1)[0] + "/4",
    )
    api = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefq")), "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    wait_for_port(port, 60)
    from tests.services import make_key

    yield f"http://127.0.0.1:{port}", make_key(url, "fuzz")
    stop([api])
    drop_pg_database(name)


def test_generated_requests_get_documented_answers_and_no_5xx(live_api, tmp_path):
    live_api, key = live_api
    report = tmp_path / "report.json"
    examples = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "8")
    out = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{live_api}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            examples,
            "--seed",
            "1",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            "--request-timeout",
            "10",
            "-H",
            f"Authorization: Bearer {key}",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-6000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) >= 100, out.stdout[-3000:]
    print(cases.group(0))
