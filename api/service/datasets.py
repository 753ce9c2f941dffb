"""Datasets: validate an upload as it streams (memory stays bounded whatever its size) and store it under the
tenant's prefix; every face's upload (`POST /datasets`, `POST /v1/files`, the dashboard's form) goes through here."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from api.auth import Principal
from api.deps import Services
from api.service.errors import Invalid
from jobs import layout
from jobs.models import Dataset, new_id
from training.formats import Limits, bounded_lines, check_lines


def _lines_and_hash(lines, copy, digest):
    """Pass the upload's lines on while hashing them into a temporary copy."""
    for line in lines:
        if isinstance(line, bytes):
            digest.update(line)
            copy.write(line)
        yield line


def store(svc: Services, who: Principal, fh, filename: str, method: str | None) -> Dataset:
    """Validate and store an uploaded JSONL file; a bad file is an `Invalid` (field `file`) with every error (line,
    field, reason) in its details, and nothing is stored."""
    s = svc.settings
    limits = Limits(max_rows=s.max_rows, max_line_bytes=s.max_line_bytes, max_json_depth=s.max_json_depth)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as copy:
        lines = _lines_and_hash(bounded_lines(fh, s.max_line_bytes), copy, digest)
        report, _ = check_lines(lines, method, limits, keep=False)
        if not report.ok:
            raise Invalid(
                "invalid_dataset",
                f"{report.error_count} error(s) in {filename}",
                "file",
                [vars(p) for p in report.errors],
            )
        copy.flush()
        dataset_id = new_id("ds")
        key = layout.dataset_key(who.tenant, dataset_id)
        svc.storage.put_file(Path(copy.name), key)
        size = copy.tell()
    dataset = Dataset(
        id=dataset_id,
        tenant=who.tenant,
        filename=filename,
        uri=svc.storage.uri(key),
        bytes=size,
        sha256=digest.hexdigest(),
        rows=report.rows,
        format=report.format,
        method=report.method,
        warnings=[vars(p) for p in report.warnings],
        warning_count=report.warning_count,
        tool_examples=report.tool_examples,
        untrained_messages=report.untrained_messages,
    )
    svc.store.add(dataset)
    return dataset
