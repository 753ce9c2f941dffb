"""The service layer: what a job, its events, its files and the registry can be asked to do, as plain functions
over the job store and storage. Every face of the API (`api.routes`, `api.openai`, `api.ui`) calls these and never
another face; each face turns `api.service.errors` into its own answers through one table of its own.

| module | what |
| --- | --- |
| `errors` | the domain errors (`ServiceError` and its kinds), each naming the native field |
| `checks` | what a submission is checked for: references (datasets, model), spec, callback URL, room |
| `jobs` | submit, read and list, cancel, retry, pause, resume: the tenant guard and the state changes |
| `events` | a job's events as a typed live stream (the SSE faces frame it) |
| `artifacts` | checkpoints, the model's files, artifacts, samples, curves |
| `registry` | promote a job's model, a registered model with its versions and aliases |
"""
