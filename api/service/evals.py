"""Evaluations (`/evals`, and OpenAI's Evals API under `/v1/evals`): an evaluation names testing criteria; each of
its runs is a job of method 'eval' on the same queue and workers as training (`training.evaluate`), so a run has the
events, cancel, lease, retry and tenant rules of any job. The criteria are checked (graders, judges) when the
evaluation is created and again when a run is queued; a run's results are its job's artifacts
(`eval_results.json`, `eval_items.jsonl`).
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.deps import Services
from api.schemas import EvalCreate, EvalRunCreate, JobCreate
from api.service import graders
from api.service import jobs as job_service
from api.service.errors import Invalid, no_such
from jobs import layout, modelref
from jobs.models import Eval, Job, JobStatus, new_id
from storage import StorageError
from training import graders as grader_types
from training.spec import EVAL_METRICS, EvaluationSpec, PairwiseSpec, describe_errors

RESULTS, ITEMS = "eval_results.json", "eval_items.jsonl"  # `training.evaluate`'s files, the run's artifacts
GRADER_TYPES = grader_types.TYPES
OWN_TYPES = {"reference_metrics", "preference", "pairwise"}
RUN_STATUS = {  # OpenAI's names of a run's states
    JobStatus.queued: "queued",
    JobStatus.running: "in_progress",
    JobStatus.cancelling: "in_progress",
    JobStatus.succeeded: "completed",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "canceled",
}


def evaluation(criteria: list[dict]) -> dict:
    """The testing criteria as the run's `evaluation` spec (`training.spec.EvaluationSpec`, less the run's own
    fields); an `Invalid` naming `testing_criteria.N...` for the first that is wrong."""
    out: dict = {"metrics": [], "graders": {}, "pass_thresholds": {}}
    for i, criterion in enumerate(criteria):
        where = f"testing_criteria.{i}"
        kind = criterion.get("type")
        kind = kind if isinstance(kind, str) else repr(kind)
        if kind in GRADER_TYPES:
            try:
                parsed = grader_types.parse(criterion)
            except grader_types.GraderError as exc:
                raise Invalid("invalid_grader", str(exc), where + exc.param.removeprefix("grader")) from None
            if parsed.name in out["graders"]:
                raise Invalid(
                    "invalid_eval", f"two criteria are named {parsed.name!r}; name each once", where + ".name"
                )
            out["graders"][parsed.name] = criterion
            if (threshold := criterion.get("pass_threshold")) is not None:
                out["pass_thresholds"][parsed.name] = threshold
        elif kind == "reference_metrics":
            metrics = criterion.get("metrics") or ["exact_match", "f1", "rouge_l", "bleu", "perplexity"]
            listed = isinstance(metrics, list)
            unknown = [m for m in metrics if m not in EVAL_METRICS or m == "reward_accuracy"] if listed else [metrics]
            if unknown:
                raise Invalid(
                    "invalid_eval",
                    f"unknown metric {unknown[0]!r}; give a list of exact_match, f1, rouge_l, bleu, perplexity",
                    where + ".metrics",
                )
            out["metrics"] += [m for m in metrics if m not in out["metrics"]]
        elif kind == "preference":
            out["metrics"].append("reward_accuracy")
        elif kind == "pairwise":
            if "pairwise" in out:
                raise Invalid("invalid_eval", "one pairwise judge per evaluation", where)
            given = {k: v for k, v in criterion.items() if k not in ("type", "name")}
            try:
                out["pairwise"] = PairwiseSpec.model_validate(given).model_dump(exclude_none=True)
            except ValidationError as exc:
                first = describe_errors(exc)[0]
                raise Invalid("invalid_eval", first["reason"], f"{where}.{first['field']}") from None
        else:
            known = ", ".join(sorted(GRADER_TYPES | OWN_TYPES))
            raise Invalid("invalid_eval", f"unknown criterion type {kind!r}; choose from {known}", where + ".type")
    return out


async def _check_judges(svc: Services, tenant: str, criteria: list[dict]) -> None:
    """Each judge the criteria name is one `tenant` may use (a 400 naming `testing_criteria.N...` otherwise)."""
    for i, criterion in enumerate(criteria):
        if criterion["type"] in GRADER_TYPES:
            await graders.check_judges(svc, tenant, criterion, f"testing_criteria.{i}", "")
        elif criterion["type"] == "pairwise":
            judge = {"type": "label_model", "model": criterion["judge"]}
            try:
                await graders.check_judges(svc, tenant, judge)
            except Invalid as exc:
                exc.field = f"testing_criteria.{i}.judge"
                raise


async def create(svc: Services, who: Principal, req: EvalCreate) -> Eval:
    part = evaluation(req.testing_criteria)
    try:  # as a run will check it (its baseline is the run's)
        EvaluationSpec.model_validate({**part, "baseline": "-"})
    except ValidationError as exc:
        first = describe_errors(exc)[0]
        raise Invalid("invalid_eval", first["reason"], f"testing_criteria ({first['field']})") from None
    await _check_judges(svc, who.tenant, req.testing_criteria)
    row = Eval(
        id=new_id("eval"),
        tenant=who.tenant,
        name=req.name,
        data_source_config=req.data_source_config,
        testing_criteria=req.testing_criteria,
        user_metadata=req.metadata,
    )
    await run_in_threadpool(svc.store.add, row)
    return row


def owned(svc: Services, who: Principal, eval_id: str) -> Eval:
    found = svc.store.get_eval(eval_id)
    if found is None or not who.owns(found.tenant):
        raise no_such("eval", eval_id)
    return found


def list_evals(svc: Services, who: Principal, limit: int, after: str | None) -> tuple[list[Eval], bool]:
    return svc.store.list_evals(None if who.admin else who.tenant, limit, after)


def delete(svc: Services, who: Principal, eval_id: str) -> None:
    owned(svc, who, eval_id)
    svc.store.delete_eval(eval_id)


async def create_run(svc: Services, who: Principal, eval_id: str, req: EvalRunCreate) -> job_service.Submitted:
    """Queue a run of the evaluation: a job of method 'eval' on the data source's model (and baseline)."""
    found = owned(svc, who, eval_id)
    src = req.data_source
    part = evaluation(found.testing_criteria)
    if src.baseline is None and ("pairwise" in part or "reward_accuracy" in part["metrics"]):
        why = "a pairwise judge" if "pairwise" in part else "the preference criterion"
        raise Invalid(
            "invalid_eval", f"{why} of this evaluation compares with a baseline; name one", "data_source.baseline"
        )
    params = src.sampling_params
    run = {**part, "eval_id": eval_id, "baseline": src.baseline}  # checked and pinned as the job is queued
    for name, value in (
        ("max_samples", src.max_samples),
        ("max_seconds", src.max_seconds),
        ("max_tokens", params.max_completions_tokens),
        ("temperature", params.temperature),
    ):
        if value is not None:
            run[name] = value
    hyperparameters = {"evaluation": run, "sample_prompts": 0}
    if params.seed is not None:
        hyperparameters["seed"] = params.seed
    if src.max_length is not None:
        hyperparameters["max_length"] = src.max_length
    job = JobCreate(
        model=src.model,
        dataset=src.source.id,
        method="eval",
        gpus=src.gpus,
        hyperparameters=hyperparameters,
        metadata=req.metadata,
    )
    try:
        return await job_service.submit(svc, who, job, eval_id=eval_id, suffix=req.name)
    except Invalid as exc:  # a job's fields, as the run's request names them
        field = exc.field or ""
        if field.startswith("hyperparameters.evaluation."):
            exc.field = "data_source." + field.removeprefix("hyperparameters.evaluation.")
        elif field in ("model", "dataset"):
            exc.field = "data_source." + ("source.id" if field == "dataset" else "model")
        raise


def runs(svc: Services, who: Principal, eval_id: str, limit: int, after: str | None) -> tuple[list[Job], bool]:
    found = owned(svc, who, eval_id)
    return svc.store.list_jobs(limit=limit, after=after, tenant=found.tenant, eval_id=eval_id)


def runs_of_model(svc: Services, job: Job, limit: int = 10) -> list[Job]:
    """The newest evaluation runs of a training job's model (named by its job id or its fine-tuned name) and of its
    checkpoints (`...:ckpt-step-N`): side by side, a comparison of the checkpoints."""
    if job.method == "eval":
        return []
    name = modelref.fine_tuned_name(job.model, job.tenant, job.suffix, job.id)
    return svc.store.eval_runs(job.tenant, [job.id, name], limit, prefix=f"{name}:ckpt-step-")


def owned_run(svc: Services, who: Principal, eval_id: str, run_id: str) -> Job:
    owned(svc, who, eval_id)
    job = svc.store.get_job(run_id)
    if job is None or job.eval_id != eval_id or not who.owns(job.tenant):
        raise no_such("eval run", run_id)
    return job


def _artifact(svc: Services, job: Job, name: str) -> bytes | None:
    """One of a succeeded run's result files, or None."""
    if job.status != JobStatus.succeeded:
        return None
    try:
        return svc.storage.get_bytes(layout.artifacts_prefix(job.tenant, job.id) + name)
    except StorageError:
        return None


def results(svc: Services, job: Job) -> dict | None:
    """A finished run's summary (`training.evaluate`): each model's metrics, the pairwise win rate, counts."""
    found = _artifact(svc, job, RESULTS)
    return json.loads(found) if found else None


def item_index(job: Job, after: str | None) -> int | None:
    """The row an `after` cursor names (an output item's id, `<run id>-<row>`); an `Invalid` for anything else."""
    if after is None:
        return None
    run, _, index = after.rpartition("-")
    if run != job.id or not index.isdigit():
        raise Invalid(
            "invalid_cursor", f"{after!r} is no output item of run {job.id}; pass the last item's id", "after"
        )
    return int(index)


def items(svc: Services, job: Job, limit: int, after: int | None) -> tuple[list[dict], bool]:
    """A page of the run's rows (answers, grades, the judge's verdicts), by index."""
    found = _artifact(svc, job, ITEMS)
    rows = [json.loads(line) for line in found.decode().splitlines() if line.strip()] if found else []
    if after is not None:
        rows = [r for r in rows if r["index"] > after]
    return rows[:limit], len(rows) > limit


def output_item(job: Job, row: dict) -> dict:
    """A row of a run as OpenAI's `eval.run.output_item`: the model's answer and each grader's result (pass: every
    grader passed), with prefq's reference, baseline answer, judge verdicts and scores."""
    grades = (row.get("grades") or {}).get("model") or {}
    results = [{"name": n, "score": g["score"], "passed": g["passed"]} for n, g in grades.items()]
    return {
        "id": f"{job.id}-{row['index']}",
        "object": "eval.run.output_item",
        "eval_id": job.eval_id,
        "run_id": job.id,
        "created_at": int(job.finished_at or job.created_at),
        "status": ("pass" if all(r["passed"] for r in results) else "fail") if results else "completed",
        "datasource_item_id": row["index"],
        "datasource_item": {"prompt": row["prompt"], "reference": row.get("reference")},
        "results": results,
        "sample": {
            "input": [{"role": "user", "content": row["prompt"]}],
            "output": [{"role": "assistant", "content": row["answers"]["model"]}],
            "model": job.model,
        },
        "prefq": {k: row.get(k) for k in ("answers", "grades", "judge", "pair_score", "reward_margin", "reference")},
    }


def _counts(summary: dict | None) -> tuple[dict, list[dict]]:
    """OpenAI's `result_counts` and `per_testing_criteria_results`, from the rows' grades of the model."""
    rows = (summary or {}).get("rows", 0)
    criteria = (summary or {}).get("criteria") or {}
    per = [{"testing_criteria": name, "passed": c["passed"], "failed": c["failed"]} for name, c in criteria.items()]
    counts = (summary or {}).get("result_counts") or {"passed": 0, "failed": 0, "errored": 0}
    return {"total": rows, **counts}, per


def run_public(svc: Services, job: Job, base_url: str = "") -> dict:
    """A run as OpenAI's `eval.run`, with prefq's results (`prefq`)."""
    summary = results(svc, job)
    counts, per = _counts(summary)
    evaluation_spec = job.hyperparameters.get("evaluation") or {}
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": job.id,
        "object": "eval.run",
        "eval_id": job.eval_id,
        "name": job.suffix or job.id,
        "status": RUN_STATUS[job.status],
        "model": job.model,
        "created_at": int(job.created_at),
        "data_source": {
            "type": "completions",
            "model": job.model,
            "source": {"type": "file_id", "id": job.dataset_id},
            "baseline": evaluation_spec.get("baseline"),
        },
        "result_counts": counts,
        "per_testing_criteria_results": per,
        "per_model_usage": None,
        "report_url": f"{base_url}/ui/jobs/{job.id}",
        "error": error,
        "metadata": job.user_metadata,
        "prefq": {"job_id": job.id, "results": summary, "metrics": job.eval_metrics},
    }


def eval_public(row: Eval) -> dict:
    return {
        "id": row.id,
        "object": "eval",
        "name": row.name,
        "data_source_config": row.data_source_config,
        "testing_criteria": row.testing_criteria,
        "created_at": int(row.created_at),
        "metadata": row.user_metadata,
    }
