"""POST /datasets (validate while streaming, then store), GET /datasets/{id}, GET /datasets."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from api.auth import Caller
from api.deps import Cursor, DatasetId, Services, services
from api.errors import not_found, responses
from api.schemas import DatasetPublic, DatasetsPublic
from api.service import datasets

router = APIRouter(tags=["datasets"])


@router.post("/datasets", status_code=201, response_model=DatasetPublic, responses=responses(400, 401, 413, 422))
def create_dataset(
    who: Caller,
    file: UploadFile = File(description="JSONL, one example per line"),
    method: str | None = Form(None, pattern="^(dpo|sft|kto|rft)$"),
    svc: Services = Depends(services),
) -> DatasetPublic:
    """Validate a JSONL file and store it; a bad file gets every error (line, field, reason) and nothing is stored."""
    filename = (file.filename or "data.jsonl")[:255]
    return DatasetPublic.of(datasets.store(svc, who, file.file, filename, method))


@router.get("/datasets/{dataset_id}", response_model=DatasetPublic, responses=responses(401, 404, 422))
def get_dataset(dataset_id: DatasetId, who: Caller, svc: Services = Depends(services)) -> DatasetPublic:
    dataset = svc.store.get_dataset(dataset_id)
    if dataset is None or not who.owns(dataset.tenant):
        raise not_found("dataset", dataset_id)
    return DatasetPublic.of(dataset)


@router.get("/datasets", response_model=DatasetsPublic, responses=responses(401, 422))
def list_datasets(
    who: Caller,
    limit: int = Query(20, ge=1, le=100),
    after: Cursor | None = None,
    tenant: str | None = Query(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="admin keys: one tenant's"),
    svc: Services = Depends(services),
) -> DatasetsPublic:
    """The tenant's datasets, newest first (an admin key sees every tenant's, or `tenant`'s)."""
    scope = tenant if who.admin else who.tenant
    rows, more = svc.store.list_datasets(scope, limit, after)
    return DatasetsPublic(
        data=[DatasetPublic.of(d) for d in rows], has_more=more, next_cursor=rows[-1].id if more else None
    )
