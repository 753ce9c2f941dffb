"""Reference log-probs cached in a local folder, keyed by everything that determines them.

With precomputed reference log-probs a DPO run scores every pair of its training (and eval) split with the
reference model once, before training. A retried, resumed or re-run job would pay that pass again; with
`ref_cache_dir` set, the run looks in that folder first and writes what it computed there:

    <ref_cache_dir>/ref-logps-<key>.safetensors    tensors `chosen` and `rejected` (float32, one value per row, in
                                                   the order of the prepared split); metadata `key`, `rows`

`<key>` is the sha256 of `key_document`'s JSON:
- `reference`: the reference model folder's fingerprint, the sha256 over every file's relative path, size and
  full sha256 (config, tokenizer files, weights). Full hashes, not samples: a fine-tuned model keeps its base's
  file sizes and safetensors headers, and sampled blocks could miss the layers that changed. sha256 runs at about
  1.6 GB/s per core here (SHA-NI), one thread per file: about 10 s of one core for a 7B bf16 folder, against
  minutes to hours for the reference pass itself.
- `rows`: the sha256 of the split's token ids as the pass sees them (`prompt_ids`, `chosen_ids`, `rejected_ids`
  after TRL's tokenisation, chat template and EOS, and prefq's `max_prompt_length` cut). Dataset content,
  tokenizer, chat template, prompt cap, and which rows a split took (eval seed and fraction) are in it by
  construction.
- `max_length` and `truncation_mode`, applied after that, by the collator.
- what computes the numbers: `precision`, the device type, the log-prob path (prefq's completion head or TRL's
  fused head, packed or padded), and the torch, transformers and trl versions.

The file is written under a temporary name and renamed: a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
FORMAT = 1  # the layout of the cache file and of the key document


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the relative path, size and sha256 of every file under `folder` (hidden ones skipped)."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(_file_sha256, files))
    listing = [[str(p.relative_to(folder)), p.stat().st_size, d] for p, d in zip(files, digests, strict=True)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def rows_digest(dataset) -> str:
    """sha256 of the token ids of a prepared DPO split, row by row, in order."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=10_000):
        for name in TOKEN_COLUMNS:
            column = batch[name]
            for values in (pc.list_value_length(column), pc.list_flatten(column)):
                digest.update(np.asarray(values, dtype=np.int64).tobytes())
    return digest.hexdigest()


def key_document(reference: str, rows: str, settings: dict) -> dict:
    import transformers
    import trl

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    return {"format": FORMAT, "reference": reference, "rows": rows, **settings, "versions": versions}


def cache_key(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def cache_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"ref-logps-{key}.safetensors"


def load(path: Path, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) log-probs, or None when the file is missing or is not for this key and split."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key or meta.get("rows") != str(rows):
            return None
        return f.get_tensor("chosen"), f.get_tensor("rejected")


def store(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tensors = {"chosen": chosen.float().contiguous(), "rejected": rejected.float().contiguous()}
    save_file(tensors, str(tmp), metadata={"key": key, "rows": str(len(chosen))})
    os.replace(tmp, path)
