"""POST /datasets (validate, then store) and GET /datasets/{id}."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, UploadFile

from api.deps import DatasetId, Services, services
from api.errors import APIError, not_found, responses
from api.schemas import DatasetPublic
from jobs.models import Dataset, new_id
from training.formats import check_lines

router = APIRouter(tags=["datasets"])


def _lines_and_hash(upload, copy, digest):
    """Stream the upload line by line into a temporary copy while hashing it."""
    for line in upload:
        digest.update(line)
        copy.write(line)
        yield line


@router.post("/datasets", status_code=201, response_model=DatasetPublic, responses=responses(400, 401, 422))
def create_dataset(file: UploadFile = File(description="JSONL, one example per line"),
                   method: str | None = Form(None, pattern="^(dpo|sft)$"),
                   svc: Services = Depends(services)) -> DatasetPublic:  # fmt: skip
    """Validate a JSONL file and store it; a bad file gets every error (line, field, reason) and nothing is stored."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as copy:
        report, _ = check_lines(_lines_and_hash(file.file, copy, digest), method)
        if not report.ok:
            raise APIError(422, "invalid_dataset", f"{report.error_count} error(s) in {file.filename}", field="file",
                           details=[vars(p) for p in report.errors])  # fmt: skip
        copy.flush()
        dataset_id = new_id("ds")
        key = f"datasets/{dataset_id}.jsonl"
        svc.storage.put_file(Path(copy.name), key)
        size = copy.tell()
    dataset = Dataset(id=dataset_id, filename=file.filename or "data.jsonl", uri=svc.storage.uri(key), bytes=size,
                      sha256=digest.hexdigest(), rows=report.rows, format=report.format, method=report.method,
                      warnings=[vars(p) for p in report.warnings], warning_count=report.warning_count)  # fmt: skip
    svc.store.add(dataset)
    return DatasetPublic(**dataset.model_dump())


@router.get("/datasets/{dataset_id}", response_model=DatasetPublic, responses=responses(401, 404, 422))
def get_dataset(dataset_id: DatasetId, svc: Services = Depends(services)) -> DatasetPublic:
    dataset = svc.store.get_dataset(dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return DatasetPublic(**dataset.model_dump())
