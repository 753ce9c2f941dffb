"""Object storage behind one interface: a local folder (`file://`) or any S3 endpoint (`s3://`)."""

from storage.base import Storage, StorageError, contained, get_dir, open_storage, open_uri, put_dir

__all__ = ["Storage", "StorageError", "contained", "get_dir", "open_storage", "open_uri", "put_dir"]
