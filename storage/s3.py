"""Storage on any S3 endpoint (AWS, MinIO, SeaweedFS) through boto3; big files go up in parts."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.base import StorageError

# Files above 64 MiB go up as multipart uploads of 64 MiB parts, 4 at a time.
TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)


class S3Storage:
    def __init__(
        self, url: str, endpoint_url: str | None, region: str, access_key_id: str | None, secret_access_key: str | None
    ):
        self.url = url
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"{what}: {exc}") from exc

    def put_file(self, local: Path, key: str) -> None:
        self._call(
            f"upload {self.uri(key)}", self.client.upload_file, str(local), self.bucket, self._key(key), Config=TRANSFER
        )

    def put_bytes(self, data: bytes, key: str) -> None:
        self._call(f"upload {self.uri(key)}", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, local: Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._call(
            f"download {self.uri(key)}",
            self.client.download_file,
            self.bucket,
            self._key(key),
            str(local),
            Config=TRANSFER,
        )

    def get_bytes(self, key: str) -> bytes:
        buf = io.BytesIO()
        self._call(f"download {self.uri(key)}", self.client.download_fileobj, self.bucket, self._key(key), buf)
        return buf.getvalue()

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self._key(""))
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        try:
            for page in pages:
                keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"list {self.uri(prefix)}: {exc}") from exc
        return sorted(keys)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"head {self.uri(key)}: {exc}") from exc

    def delete(self, prefix: str) -> int:
        keys = self.list(prefix) if prefix.endswith("/") else ([prefix] if self.exists(prefix) else [])
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call(
                f"delete under {self.uri(prefix)}",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        return self._call(
            "presign", self.client.generate_presigned_url, "get_object", Params=params, ExpiresIn=expires_s
        )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"
