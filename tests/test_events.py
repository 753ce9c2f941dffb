"""The run's event protocol read back (`training.events`): one reading of a line and of the metrics in events, which
the worker, tracking, the API and the dashboard share."""

import json

import pytest

from training.events import metrics_by_step, metrics_of, read_event

PROGRESS = {
    "step": 4,
    "total_steps": 8,
    "epoch": 0.5,
    "loss": 0.69,
    "learning_rate": 1e-4,
    "metrics": {"rewards/accuracies": 0.75, "rewards/margins": None},
}


def test_a_line_reads_back_as_its_type_and_fields():
    line = json.dumps({"event": "progress", "time": 1.5, **PROGRESS})
    assert read_event(line) == ("progress", {"time": 1.5, **PROGRESS})
    for bad in ("not json", "[1, 2]", '{"step": 4}', '{"event": 3}'):
        with pytest.raises(ValueError):
            read_event(bad)


def test_metrics_are_the_numbers_of_progress_and_eval_events_by_step():
    step, metrics = metrics_of("progress", PROGRESS)
    assert (step, metrics) == (4, {"loss": 0.69, "learning_rate": 1e-4, "epoch": 0.5, "rewards/accuracies": 0.75})
    assert metrics_of("eval", {"step": 4, "metrics": {"eval_loss": 0.6}}) == (4, {"eval_loss": 0.6})
    assert metrics_of("checkpoint", {"step": 4, "path": "/x"}) is None
    events = [
        ("progress", PROGRESS),
        ("eval", {"step": 4, "metrics": {"eval_loss": 0.6}}),
        ("started", {}),
        ("progress", {**PROGRESS, "step": 8, "loss": None}),
    ]
    by_step = metrics_by_step(events)
    assert by_step[4] == {**metrics, "eval_loss": 0.6}
    assert "loss" not in by_step[8], "a NaN (null) is no value"
