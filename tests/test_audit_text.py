"""The text rule (`api.text`): a NUL or text that UTF-8 cannot encode (a lone surrogate, which a JSON `\\udc00`
escape decodes to) is refused with a 4xx naming the field, before anything is written, wherever text comes in.

The routes and their fields are generated: from `app.openapi()` (every operation's path, query and header
parameters, and every string its JSON or form body can hold, map keys included) and from the dashboard's routes
(their declared parameters, and the fields of the new-job page's form). A new route is swept without a change
here. Everything runs on PostgreSQL, which refuses NUL in text where SQLite keeps it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, select

from api.app import create_app
from jobs.db import session, upgrade
from jobs.registry import Registry
from settings import Settings
from tests.test_api import GOOD
from tests.test_registry import succeeded_job

BAD = {"NUL": "\x00", "surrogate": "\udc00"}  # what a URL, a header or a form can carry of them: NUL (see `_url`)
KEY = object()  # a slot that is a map's key, not a value


@dataclass
class World:
    client: TestClient  # an admin key, and a dashboard session (cookie) of the same key
    csrf: str
    ids: dict  # what a path parameter of each name stands for: ids that exist
    bases: dict  # a valid JSON body of each schema that needs one (others are made from the schema)
    engine: object = field(repr=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory, broker_url) -> World:
    from tests.services import create_pg_database, drop_pg_database, make_key

    url, name = create_pg_database()
    upgrade(url)
    root = tmp_path_factory.mktemp("text")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")
    settings = Settings(
        data_dir=root / "data",
        database_url=url,
        broker_url=broker_url.rsplit("/", 1)[0] + "/3",
        model_roots=[str(root)],
        callback_allow_private=True,
    )
    key = make_key(url, "default", admin=True)
    spare = make_key(url, "default").split("_")[1]  # revoked by nothing but a failing case
    client = TestClient(create_app(settings), raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"})
    engine = client.app.state.services.store.engine
    dataset = client.post("/datasets", files={"file": ("pairs.jsonl", GOOD)}).json()["id"]
    job = client.post("/jobs", json={"model": str(root / "model"), "dataset": dataset, "method": "dpo"}).json()["id"]
    done = succeeded_job(engine, "default")
    Registry(engine).promote(done, "tiny", "ft:tiny", ["production"])
    client.post("/ui/login", data={"key": key, "next": "/ui/new"})
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', client.get("/ui/new").text).group(1)
    ids = {
        "job_id": job,
        "dataset_id": dataset,
        "file_id": dataset,
        "name": "tiny",
        "alias": "production",
        "version": "1",
        "key_id": spare,
        "model": "tiny",
        "path": "metrics.csv",
    }
    bases = {
        "JobCreate": {"model": str(root / "model"), "dataset": dataset, "method": "dpo"},
        "FineTuningJobCreate": {
            "model": str(root / "model"),
            "training_file": dataset,
            "method": {"type": "dpo", "dpo": {}},
        },
        "ChatCompletionCreate": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        "CompletionCreate": {"model": "tiny", "prompt": "hi"},
        "PromoteRequest": {"job_id": done.id},
        "AliasRequest": {"version": 1},
        "KeyCreate": {"tenant": "acme"},
    }
    yield World(client, csrf, ids, bases, engine)
    client.close()
    drop_pg_database(name)


def snapshot(engine) -> dict:
    """Every row of every table, but the keys' last use (which any authenticated request may write)."""
    tables = MetaData()
    tables.reflect(engine)
    with session(engine) as s:
        return {
            name: sorted(
                repr({k: v for k, v in row._mapping.items() if k != "last_used_at"}) for row in s.execute(select(table))
            )
            for name, table in tables.tables.items()
        }


# -- the generated list ---------------------------------------------------------------------------------------


@dataclass
class Case:
    what: str  # e.g. "POST /jobs body metadata.<key> (surrogate)"
    method: str
    path: str
    field: str  # the name the answer must give
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    body: dict | None = None  # JSON
    form: dict | None = None  # sent as multipart, with `files`: {name: (file name, bytes)}
    files: dict = field(default_factory=dict)


def _resolve(schema: dict, doc: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _kinds(schema: dict, doc: dict) -> list[dict]:
    schema = _resolve(schema, doc)
    return [_resolve(k, doc) for k in schema.get("anyOf") or schema.get("oneOf") or [schema]]


def string_slots(schema: dict, doc: dict, prefix: tuple = ()) -> list[tuple]:
    """The paths of every string a JSON value of `schema` can hold; KEY stands for a map's keys."""
    slots = []
    for kind in _kinds(schema, doc):
        if kind.get("type") in ("string", None) and "properties" not in kind:  # no type: any value, a string too
            slots.append(prefix)
        elif kind.get("type") == "object":
            for name, sub in kind.get("properties", {}).items():
                slots += string_slots(sub, doc, (*prefix, name))
            extra = kind.get("additionalProperties")
            if extra:  # a map: its keys are text too; `true` takes any value, a string among them
                slots += [(*prefix, KEY), *string_slots(extra if isinstance(extra, dict) else {}, doc, (*prefix, "k"))]
        elif kind.get("type") == "array":
            slots += string_slots(kind.get("items", {}), doc, (*prefix, 0))
    return list(dict.fromkeys(slots))


def example(schema: dict, doc: dict, bases: dict):
    """A value of `schema`: the world's valid body for a named schema, else its required fields made up."""
    name = schema.get("$ref", "").rsplit("/", 1)[-1]
    if name in bases:
        return json.loads(json.dumps(bases[name]))
    kind = next((k for k in _kinds(schema, doc) if k.get("type") != "null"), {})
    if "enum" in kind:
        return kind["enum"][0]
    made = {"string": "x", "integer": 1, "number": 1, "boolean": False, "array": []}
    if kind.get("type") == "object":
        return {p: example(kind["properties"][p], doc, bases) for p in kind.get("required", [])}
    return made.get(kind.get("type"), "x")


def place(body, slot: tuple, bad: str, schema: dict, doc: dict, bases: dict):
    """`body` with `bad` at `slot`, the containers on the way made (from `schema`) where the body has none."""
    head, rest = slot[0], slot[1:]
    if head is KEY:
        return {**body, bad: "v"}
    if not rest:
        value = bad
    else:
        sub = _child(schema, head, doc)
        inner = body[head] if isinstance(body, (dict, list)) and _has(body, head) else example(sub, doc, bases)
        if not isinstance(inner, (dict, list)):
            inner = [] if isinstance(rest[0], int) else {}
        value = place(inner, rest, bad, sub, doc, bases)
    if isinstance(head, int):
        return [value, *body[1:]] if body else [value]
    return {**body, head: value}


def _has(body, head) -> bool:
    return head < len(body) if isinstance(body, list) else head in body


def _child(schema: dict, head, doc: dict) -> dict:
    for kind in _kinds(schema, doc):
        if isinstance(head, int) and kind.get("type") == "array":
            return kind.get("items", {})
        if kind.get("type") == "object":
            if head in kind.get("properties", {}):
                return kind["properties"][head]
            if isinstance(kind.get("additionalProperties"), dict):
                return kind["additionalProperties"]
    return {}


def _name(slot: tuple) -> str:
    """The field an answer names for a slot: dotted, a bad key named by its map."""
    return ".".join(str(p) for p in slot if p is not KEY)


def _url(path: str, ids: dict, bad_param: str | None = None) -> str:
    """`path` with each parameter an existing id, `bad_param`'s holding a NUL (%00). A URL cannot carry a lone
    surrogate: the server decodes its percent-escapes of bad UTF-8 to U+FFFD."""

    def fill(match):
        name = match.group(1).split(":")[0]
        return "x%00" if name == bad_param else ids.get(name, "x")

    return re.sub(r"\{([^}]+)\}", fill, path)


def api_cases(w: World) -> list[Case]:
    doc = w.client.app.openapi()
    cases = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            route = f"{method.upper()} {path}"
            for p in op.get("parameters", []):
                where = {"path": "path", "query": "params", "header": "headers"}[p["in"]]
                url = _url(path, w.ids, p["name"] if where == "path" else None)
                case = Case(f"{route} {p['in']} {p['name']}", method.upper(), url, p["name"])
                if where != "path":
                    getattr(case, where)[p["name"]] = "x\x00"
                cases.append(case)
            # a parameter no route declares, as a route may read them all (`metadata[key]` of /v1's job list)
            cases.append(
                Case(
                    f"{route} query metadata[k]",
                    method.upper(),
                    _url(path, w.ids),
                    "metadata[k]",
                    params={"metadata[k]": "x\x00"},
                )
            )
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                schema = content["application/json"]["schema"]
                base = example(schema, doc, w.bases)
                for slot in string_slots(schema, doc):
                    for label, bad in BAD.items():
                        body = place(base, slot, bad, schema, doc, w.bases)
                        what = ".".join("<key>" if p is KEY else str(p) for p in slot)
                        cases.append(
                            Case(
                                f"{route} body {what} ({label})",
                                method.upper(),
                                _url(path, w.ids),
                                _name(slot),
                                body=body,
                            )
                        )
            for kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
                if kind in content:
                    props = _resolve(content[kind]["schema"], doc).get("properties", {})
                    cases += form_cases(route, _url(path, w.ids), props, {})
    return cases


def form_cases(route: str, url: str, props: dict, base: dict) -> list[Case]:
    """A NUL in each field of a form (a file field: in its file name); the others valid or empty."""
    files = {
        n: ("pairs.jsonl", GOOD) for n, s in props.items() if s.get("format") == "binary" or "contentMediaType" in s
    }
    fields = {n: base.get(n, "") for n in props if n not in files}
    cases = []
    for name in props:
        form, sent = dict(fields), dict(files)
        if name in files:
            sent[name] = ("p\x00.jsonl", GOOD)
        else:
            form[name] = "x\x00"
        cases.append(Case(f"{route} form {name}", "POST", url, name, form=form, files=sent))
    return cases


def ui_cases(w: World) -> list[Case]:
    """The dashboard's routes (outside the OpenAPI document): their declared parameters; the new-job form's fields
    (which its route reads itself) from the page."""
    page = w.client.get("/ui/new").text
    job_form = re.search(r'<form[^>]* action="/ui/jobs".*?</form>', page, re.S).group(0)
    new_job = re.findall(r'<(?:input|select|textarea)[^>]* name="([^"]+)"', job_form)
    cases = []
    for route in iter_route_contexts(w.client.app.routes):
        if not route.path.startswith("/ui") or getattr(route, "dependant", None) is None:
            continue
        for method in route.methods - {"HEAD"}:
            label = f"{method} {route.path}"
            for p in route.dependant.path_params:
                cases.append(Case(f"{label} path {p.alias}", method, _url(route.path, w.ids, p.alias), p.alias))
            for p in route.dependant.query_params:
                cases.append(
                    Case(
                        f"{label} query {p.alias}", method, _url(route.path, w.ids), p.alias, params={p.alias: "x\x00"}
                    )
                )
            if method == "POST":
                props = {
                    p.alias: {"format": "binary"} if "UploadFile" in repr(p.field_info.annotation) else {}
                    for p in route.dependant.body_params
                }
                if route.path == "/ui/jobs":
                    props = {n: {} for n in new_job if n != "csrf"}
                base = {
                    "csrf": w.csrf,
                    "model": w.bases["JobCreate"]["model"],
                    "dataset": w.ids["dataset_id"],
                    "method": "dpo",
                }
                for case in form_cases(label, _url(route.path, w.ids), props, base):
                    case.form["csrf"] = w.csrf
                    cases.append(case)
    return cases


def send(w: World, case: Case):
    kwargs = {"params": case.params, "headers": case.headers}
    if case.body is not None:
        kwargs["content"] = json.dumps(case.body)  # ensure_ascii: NUL and surrogates as \u escapes
        kwargs["headers"] = {**case.headers, "content-type": "application/json"}
    if case.form is not None:
        kwargs["content"], kind = multipart(case.form, case.files or {})
        kwargs["headers"] = {**case.headers, "content-type": kind}
    return w.client.request(case.method, case.path, **kwargs)


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """A multipart form as a browser sends it: UTF-8, file names unescaped (httpx would percent-escape a NUL)."""
    parts = [f'Content-Disposition: form-data; name="{n}"\r\n\r\n'.encode() + v.encode() for n, v in fields.items()]
    parts += [
        f'Content-Disposition: form-data; name="{n}"; filename="{name}"\r\n'.encode()
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + data
        for n, (name, data) in files.items()
    ]
    body = b"".join(b"--b0undary\r\n" + p + b"\r\n" for p in parts) + b"--b0undary--\r\n"
    return body, "multipart/form-data; boundary=b0undary"


def named(answer, field: str) -> bool:
    try:
        error = answer.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return field in (error.get("field"), error.get("param"))


def test_every_route_refuses_nul_and_unencodable_text_naming_the_field_and_writes_nothing(world):
    cases = api_cases(world) + ui_cases(world)
    assert any(c.path == "/jobs" and c.field == "metadata.k" for c in cases), "the generator found the metadata"
    assert any(c.path.startswith("/ui/jobs") and c.form for c in cases), "the generator found the dashboard's forms"
    before = snapshot(world.engine)
    wrong = []
    for case in cases:
        answer = send(world, case)
        if not (400 <= answer.status_code < 500 and named(answer, case.field)):
            wrong.append(f"{case.what}: {answer.status_code} {answer.text[:160]}")
    after = snapshot(world.engine)
    changed = [t for t in before if before[t] != after[t]]
    assert not wrong, f"{len(wrong)} of {len(cases)} cases not a 4xx naming the field:\n" + "\n".join(wrong)
    assert not changed, f"tables written by refused requests: {changed}"
    for path in ("/jobs", "/v1/fine_tuning/jobs", "/datasets", "/v1/files", "/keys", "/models", "/ui/jobs"):
        assert world.client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "path, body, status, where",
    [
        ("/jobs", "JobCreate", 422, "field"),
        ("/v1/fine_tuning/jobs", "FineTuningJobCreate", 400, "param"),
    ],
)
def test_a_lone_surrogate_in_metadata_is_refused_before_the_job_is_written(world, path, body, status, where):
    before = snapshot(world.engine)["jobs"]
    for key, value in (("k", "\udc00"), ("\udc00", "v"), ("k", "a\x00b")):
        sent = json.dumps({**world.bases[body], "metadata": {key: value}})
        answer = world.client.post(path, content=sent, headers={"content-type": "application/json"})
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error[where] == ("metadata.k" if key == "k" else "metadata"), error
        assert "surrogate" in error["message"] or "NUL" in error["message"]
    assert snapshot(world.engine)["jobs"] == before
    assert world.client.get("/jobs").status_code == 200


def test_nul_in_the_dashboard_chat_is_a_4xx_naming_the_field(world):
    for form, name in (({"message": "hi\x00"}, "message"), ({"message": "hi", "version": "\x00"}, "version")):
        answer = world.client.post("/ui/models/tiny/chat", data={"csrf": world.csrf, **form})
        assert 400 <= answer.status_code < 500 and named(answer, name), (name, answer.status_code, answer.text[:200])


def test_nul_in_a_metadata_filter_of_the_job_list_is_a_400_naming_it(world):
    answer = world.client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "\x00"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "metadata[team]"
