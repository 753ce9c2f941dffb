"""What `max_length` does to rows, said out loud (`training.lengths`): every split's `lengths` event, and a run whose
rows are all too long refused as the user's error, naming `max_length`, before any training step."""

import json

from tests.conftest import dpo_spec, of_type, run_training
from training.spec import EXIT_OK, EXIT_USER_ERROR
from training.toy_data import FILLER


def _rows(path, n: int, prompt_words: int, *, sft: bool = False, start: int = 0, answer_words: int = 1) -> None:
    with path.open("a") as out:
        for i in range(start, start + n):
            prompt = " ".join(FILLER[(i + k) % len(FILLER)] for k in range(prompt_words)) + "?"
            answer = " " + " ".join(FILLER[(i + k) % len(FILLER)] for k in range(answer_words))
            row = (
                {"prompt": prompt, "completion": answer + "."}
                if sft
                else {"prompt": prompt, "chosen": answer + ".", "rejected": answer + "!"}
            )
            out.write(json.dumps(row) + "\n")


def test_a_dpo_run_whose_rows_are_all_too_long_is_the_users_error_naming_max_length(tmp_path, micro_model):
    data = tmp_path / "long.jsonl"
    _rows(data, 40, prompt_words=60)
    rc, events = run_training(dpo_spec(micro_model, data, max_length=32, eval_fraction=0), tmp_path / "run")
    assert rc == EXIT_USER_ERROR
    error = of_type(events, "error")[-1]
    assert error["code"] == "rows_too_long" and error["user_error"] is True
    assert "max_length=32" in error["message"] and "raise max_length" in error["message"]
    assert not of_type(events, "progress") and not of_type(events, "started")
    [train] = of_type(events, "lengths")
    assert train["split"] == "train" and train["rows"] == 40 and train["dropped"] == 40 and train["p50"] > 32


def test_a_partly_too_long_dpo_run_reports_what_it_cut_and_dropped_and_trains(tmp_path, micro_model, toy_dpo):
    data = tmp_path / "mixed.jsonl"
    data.write_text(toy_dpo.read_text())  # 400 short rows
    _rows(data, 30, prompt_words=60)  # prompts past max_length: dropped
    _rows(data, 20, prompt_words=25, start=30, answer_words=20)  # the prompt fits, prompt and answer do not: cut
    rc, events = run_training(dpo_spec(micro_model, data, max_length=40, max_steps=2, eval_fraction=0), tmp_path / "r")
    assert rc == EXIT_OK, of_type(events, "error")
    [train] = of_type(events, "lengths")
    assert train["rows"] == 450 and train["dropped"] == 30 and train["truncated"] >= 20, train
    assert of_type(events, "started")[0]["examples"] == 450  # rows handed to the trainer; 420 of them train


def test_an_sft_run_reports_rows_cut_to_max_length(tmp_path, micro_model):
    data = tmp_path / "sft.jsonl"
    _rows(data, 30, prompt_words=4, sft=True)
    _rows(data, 10, prompt_words=80, sft=True, start=30)  # the completion lies past max_length: nothing to train
    spec = {
        "method": "sft",
        "model": str(micro_model),
        "train_file": str(data),
        "eval_fraction": 0,
        "max_steps": 2,
        "batch_size": 8,
        "max_length": 32,
        "save_steps": 100,
    }
    rc, events = run_training(spec, tmp_path / "run")
    assert rc == EXIT_OK, of_type(events, "error")
    [train] = of_type(events, "lengths")
    assert train["rows"] == 40 and train["dropped"] == 10 and train["max_length"] == 32, train
