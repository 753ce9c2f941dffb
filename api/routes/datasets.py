"""POST /datasets (validate while streaming, then store), GET /datasets/{id}, GET /datasets."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from api.auth import Caller, Principal
from api.deps import Cursor, DatasetId, Services, services
from api.errors import APIError, not_found, responses
from api.schemas import DatasetPublic, DatasetsPublic
from jobs import layout
from jobs.models import Dataset, new_id
from training.formats import Limits, bounded_lines, check_lines

router = APIRouter(tags=["datasets"])


def _lines_and_hash(lines, copy, digest):
    """Pass the upload's lines on while hashing them into a temporary copy."""
    for line in lines:
        if isinstance(line, bytes):
            digest.update(line)
            copy.write(line)
        yield line


def store_dataset(svc: Services, who: Principal, fh, filename: str, method: str | None) -> Dataset:
    """Validate an uploaded JSONL file as it streams (memory stays bounded whatever its size) and store it under
    the tenant's prefix; a bad file is a 422 with every error (line, field, reason) and nothing is stored."""
    s = svc.settings
    limits = Limits(max_rows=s.max_rows, max_line_bytes=s.max_line_bytes, max_json_depth=s.max_json_depth)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as copy:
        report, _ = check_lines(_lines_and_hash(bounded_lines(fh, s.max_line_bytes), copy, digest), method, limits,
                                keep=False)  # fmt: skip
        if not report.ok:
            raise APIError(422, "invalid_dataset", f"{report.error_count} error(s) in {filename}", field="file",
                           details=[vars(p) for p in report.errors])  # fmt: skip
        copy.flush()
        dataset_id = new_id("ds")
        key = layout.dataset_key(who.tenant, dataset_id)
        svc.storage.put_file(Path(copy.name), key)
        size = copy.tell()
    dataset = Dataset(id=dataset_id, tenant=who.tenant, filename=filename, uri=svc.storage.uri(key), bytes=size,
                      sha256=digest.hexdigest(), rows=report.rows, format=report.format, method=report.method,
                      warnings=[vars(p) for p in report.warnings], warning_count=report.warning_count)  # fmt: skip
    svc.store.add(dataset)
    return dataset


@router.post("/datasets", status_code=201, response_model=DatasetPublic, responses=responses(400, 401, 413, 422))
def create_dataset(who: Caller, file: UploadFile = File(description="JSONL, one example per line"),
                   method: str | None = Form(None, pattern="^(dpo|sft)$"),
                   svc: Services = Depends(services)) -> DatasetPublic:  # fmt: skip
    """Validate a JSONL file and store it; a bad file gets every error (line, field, reason) and nothing is stored."""
    filename = (file.filename or "data.jsonl")[:255]
    return DatasetPublic.of(store_dataset(svc, who, file.file, filename, method))


@router.get("/datasets/{dataset_id}", response_model=DatasetPublic, responses=responses(401, 404, 422))
def get_dataset(dataset_id: DatasetId, who: Caller, svc: Services = Depends(services)) -> DatasetPublic:
    dataset = svc.store.get_dataset(dataset_id)
    if dataset is None or not who.owns(dataset.tenant):
        raise not_found("dataset", dataset_id)
    return DatasetPublic.of(dataset)


@router.get("/datasets", response_model=DatasetsPublic, responses=responses(401, 422))
def list_datasets(who: Caller, limit: int = Query(20, ge=1, le=100), after: Cursor | None = None,
                  tenant: str | None = Query(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
                                             description="admin keys: one tenant's"),
                  svc: Services = Depends(services)) -> DatasetsPublic:  # fmt: skip
    """The tenant's datasets, newest first (an admin key sees every tenant's, or `tenant`'s)."""
    scope = (tenant if who.admin else who.tenant)
    rows, more = svc.store.list_datasets(scope, limit, after)
    return DatasetsPublic(data=[DatasetPublic.of(d) for d in rows], has_more=more,
                          next_cursor=rows[-1].id if more else None)  # fmt: skip
