"""Reference log-probs cached by key (`training.refcache`): what the key follows, and a second run that hits."""

import io
import json
import shutil

import torch
from datasets import Dataset

from tests.test_dpo import make_trainer
from training import events, refcache
from training.spec import parse_spec


def test_the_key_follows_the_reference_weights_the_token_ids_and_the_settings(tmp_path, micro_model):
    copy = shutil.copytree(micro_model, tmp_path / "copy")
    assert refcache.folder_fingerprint(copy) == refcache.folder_fingerprint(micro_model), "content, not location"
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert refcache.folder_fingerprint(copy) != refcache.folder_fingerprint(micro_model)

    rows = {"prompt_ids": [[1, 2, 3], [4]], "chosen_ids": [[5], [6, 7]], "rejected_ids": [[8], [9]]}
    moved = {**rows, "prompt_ids": [[1, 2], [3, 4]]}  # the same tokens, split differently between rows
    assert refcache.rows_digest(Dataset.from_dict(rows)) == refcache.rows_digest(Dataset.from_dict(dict(rows)))
    assert refcache.rows_digest(Dataset.from_dict(rows)) != refcache.rows_digest(Dataset.from_dict(moved))

    def key(**settings) -> str:
        return refcache.cache_key(refcache.key_document("model", "rows", {"max_length": 64, **settings}))

    assert key() == key() != key(max_length=128)


def test_a_reference_cache_turns_precompute_on_where_there_is_a_reference():
    base = {"method": "dpo", "model": "m", "train_file": "t.jsonl"}
    assert not parse_spec(base).precomputes_reference
    assert parse_spec({**base, "ref_cache_dir": "c"}).precomputes_reference
    assert not parse_spec({**base, "ref_cache_dir": "c", "reference_free": True}).precomputes_reference
    assert not parse_spec({**base, "method": "sft", "ref_cache_dir": "c"}).precomputes_reference


def test_a_second_trainer_reads_the_cache_and_runs_no_reference_forward(tmp_path, micro_model, toy_dpo, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaModel

    calls = []
    forward = LlamaModel.forward
    monkeypatch.setattr(LlamaModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    lines = io.StringIO()
    monkeypatch.setattr(events, "_stream", lines)

    cache = tmp_path / "cache"
    first = make_trainer(tmp_path / "first", micro_model, toy_dpo, ref_cache_dir=str(cache))
    assert len(calls) == 400 // 8, "one reference forward per batch of 8 pairs"
    second = make_trainer(tmp_path / "second", micro_model, toy_dpo, ref_cache_dir=str(cache))
    assert len(calls) == 400 // 8, "none for the second"

    told = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [e["event"] for e in told] == ["lengths", "ref_logprobs", "lengths", "ref_logprobs"]
    miss, hit = told[1], told[3]
    assert miss["key"] == hit["key"]
    assert (miss["cached"], miss["forward_passes"], hit["cached"], hit["forward_passes"]) == (False, 50, True, 0)
    assert miss["rows"] == hit["rows"] == 400 and miss["split"] == "train"
    assert [p.name for p in cache.iterdir()] == [f"ref-logps-{miss['key']}.safetensors"]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(torch.tensor(first.train_dataset[column]), torch.tensor(second.train_dataset[column]))

    third = make_trainer(tmp_path / "third", micro_model, toy_dpo, ref_cache_dir=str(cache), max_length=48)
    assert json.loads(lines.getvalue().splitlines()[-1])["cached"] is False, "another max_length, another key"
    assert len(calls) == 2 * 400 // 8 and len(list(cache.iterdir())) == 2
    assert third.train_dataset.num_rows == 400
