"""One contract for every storage backend: a local folder, and S3 on a real SeaweedFS server."""

import secrets
import urllib.request

import pytest

from storage import StorageError, get_dir, open_storage, open_uri, put_dir


@pytest.fixture(params=["local", "s3"])
def options(request) -> dict:
    """What open_storage needs besides the URL."""
    if request.param == "local":
        return {}
    s3 = request.getfixturevalue("s3")
    return {k: s3[k] for k in ("endpoint_url", "access_key_id", "secret_access_key")}


@pytest.fixture
def storage(options, tmp_path, request):
    if not options:
        return open_storage(f"file://{tmp_path / 'store'}")
    bucket = request.getfixturevalue("s3")["bucket"]
    return open_storage(f"s3://{bucket}/contract-{secrets.token_hex(4)}", **options)


def test_bytes_and_files_round_trip(storage, tmp_path):
    storage.put_bytes(b"hello", "a/b.txt")
    assert storage.get_bytes("a/b.txt") == b"hello"
    assert storage.exists("a/b.txt") and not storage.exists("a/c.txt") and not storage.exists("a")
    src = tmp_path / "src.bin"
    src.write_bytes(secrets.token_bytes(300_000))
    storage.put_file(src, "big/src.bin")
    storage.get_file("big/src.bin", tmp_path / "out" / "copy.bin")
    assert (tmp_path / "out" / "copy.bin").read_bytes() == src.read_bytes()


def test_list_is_recursive_sorted_and_prefix_bound(storage):
    for key in ("x/2", "x/1", "x/sub/3", "xy/4", "z"):
        storage.put_bytes(key.encode(), key)
    assert storage.list("x/") == ["x/1", "x/2", "x/sub/3"]
    assert storage.list("") == ["x/1", "x/2", "x/sub/3", "xy/4", "z"]
    assert storage.list("nothing/") == []


def test_delete_a_key_or_a_prefix(storage):
    for key in ("d/1", "d/2", "e"):
        storage.put_bytes(b"-", key)
    assert storage.delete("e") == 1 and storage.delete("e") == 0
    assert storage.delete("d/") == 2 and storage.list("") == []


def test_missing_keys_raise_storage_errors(storage, tmp_path):
    with pytest.raises(StorageError):
        storage.get_bytes("missing")
    with pytest.raises(StorageError):
        storage.get_file("missing", tmp_path / "x")


def test_folders_upload_with_the_manifest_last(storage, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    for name in ("manifest.json", "a.bin", "sub/b.bin"):
        (src / name).write_text(name)
    keys = put_dir(storage, src, "ckpts/step-1", last="manifest.json")
    assert keys[-1] == "ckpts/step-1/manifest.json" and len(keys) == 3
    get_dir(storage, "ckpts/step-1", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "b.bin").read_text() == "sub/b.bin"
    with pytest.raises(StorageError):
        get_dir(storage, "ckpts/step-2", tmp_path / "none")


def test_presigned_urls_download_without_credentials(storage):
    storage.put_bytes(b"weights", "m/model.bin")
    with urllib.request.urlopen(storage.presigned_url("m/model.bin", expires_s=60)) as response:
        assert response.read() == b"weights"


def test_uri_names_the_key_and_opens_again(storage, options):
    storage.put_bytes(b"x", "k/v")
    uri = storage.uri("k/v")
    assert uri.startswith(storage.url) and uri.endswith("/k/v")
    other, key = open_uri(uri, **options)
    assert other.get_bytes(key) == b"x" and other.exists(key)


def test_s3_checks_signatures(s3):
    bad = open_storage(
        f"s3://{s3['bucket']}",
        endpoint_url=s3["endpoint_url"],
        access_key_id=s3["access_key_id"],
        secret_access_key="not-the-secret",
    )
    with pytest.raises(StorageError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        bad.put_bytes(b"x", "intruder")


def test_a_cached_model_in_use_opens_again_at_once_and_a_miss_is_fetched_once(tmp_path):
    """The host's model cache: a model that another user holds (a `prefq serve` child serving it) opens for a job at
    once, from the same folder, without a second fetch; it once waited for that user to let go, forever."""
    import os
    import queue
    import threading

    from storage.cache import ModelCache

    cache, fetched = ModelCache(tmp_path / "models", cap_bytes=0), []  # over its cap: it evicts what it can

    def fetch(folder):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        fetched.append(folder)

    first, held = cache.open("s3://bucket/model/", fetch)
    opened = queue.Queue()
    threading.Thread(target=lambda: opened.put(cache.open("s3://bucket/model/", fetch)), daemon=True).start()
    second, fd = opened.get(timeout=10)  # a descriptor of its own: flock treats it as another process would
    assert second == first and fetched == [first]
    assert cache.evict() == [] and first.is_dir(), "a model in use is never evicted"
    for descriptor in (held, fd):
        os.close(descriptor)
