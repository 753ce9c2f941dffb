"""Graders as OpenAI defines them (`openai.types.graders`): a sample (a model's answer) and a dataset item in, a score
out. Torch-free: the API runs them (`/v1/fine_tuning/alpha/graders/run`, `/graders/run`), and training and
evaluations will score generations with them.

| type | score |
| --- | --- |
| `string_check` | 1 or 0: `input` and `reference` equal (`eq`), different (`ne`), `reference` within `input` (`like`), the same case-blind (`ilike`) |
| `text_similarity` | 0..1: `fuzzy_match` (difflib's ratio), `bleu` (sentence BLEU-4, smoothed), `gleu` (Google BLEU), `rouge_1`..`rouge_5` and `rouge_l` (F1); `cosine` and `meteor` need models or corpora this service does not hold and are refused by name |
| `python` | what the user's `grade(sample, item)` returns, run in a sandboxed child (`run_python`) |
| `score_model` | the number a judge model answers, within `range` |
| `label_model` | 1 when the label a judge model answers is among `passing_labels`, else 0 |
| `multi` | `calculate_output`, a formula over the named graders' scores |

Templates: `{{item.FIELD}}` (dotted paths into the item), `{{sample.output_text}}`, `{{sample.output_json.FIELD}}`
(the sample parsed as JSON), `{{sample.output_tools}}` (its tool calls as JSON). A grader that cannot run (a bad
variable, a failing or slow Python grader, a judge that is down) scores 0 and says why in `errors`: it never raises
out of `grade`.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

LOCAL_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
REFUSED_METRICS = {
    "cosine": "needs an embedding model",
    "meteor": "needs WordNet's synonyms",
}


class GraderError(ValueError):
    """A grader that does not validate: `param` names the field (`grader.graders.a.operation`)."""

    def __init__(self, message: str, param: str = "grader"):
        super().__init__(message)
        self.param = param


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)


class StringCheck(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarity(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: str
    pass_threshold: float | None = None  # OpenAI's evals carry it; the score is the metric either way

    @field_validator("evaluation_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value in REFUSED_METRICS:
            raise ValueError(
                f"'{value}' {REFUSED_METRICS[value]}, which this service does not run; use one of "
                f"{', '.join(LOCAL_METRICS)}"
            )
        if value not in LOCAL_METRICS:
            raise ValueError(f"'{value}' is no metric; use one of {', '.join(LOCAL_METRICS)}")
        return value


class Python(_Grader):
    type: Literal["python"]
    source: str = Field(min_length=1, max_length=256_000)
    image_tag: str | None = None
    pass_threshold: float | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        try:
            tree = ast.parse(value)
        except SyntaxError as exc:
            raise ValueError(f"does not parse: line {exc.lineno}: {exc.msg}") from None
        except (RecursionError, MemoryError):  # nested past what the parser takes
            raise ValueError("does not parse: nested too deeply") from None
        if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
            raise ValueError("defines no function `grade(sample, item)`")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    type: Literal["message"] | None = None


class ScoreModel(_Grader):
    type: Literal["score_model"]
    model: str = Field(min_length=1)
    input: list[Message] = Field(min_length=1)
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2)
    sampling_params: dict | None = None
    pass_threshold: float | None = None

    @model_validator(mode="after")
    def _range(self) -> ScoreModel:
        if self.range[0] >= self.range[1]:
            raise ValueError(f"range: {self.range} is empty; give [low, high] with low < high")
        return self


class LabelModel(_Grader):
    type: Literal["label_model"]
    model: str = Field(min_length=1)
    input: list[Message] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _labels(self) -> LabelModel:
        unknown = [p for p in self.passing_labels if p not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels: {unknown} are not among labels {self.labels}")
        return self


def _name_of(grader, default: str) -> str:
    """A sub-grader's own name where it has a string one."""
    name = grader.get("name") if isinstance(grader, dict) else None
    return name if isinstance(name, str) else default


def sub_graders(grader: dict) -> list[dict]:
    """A `multi` grader's graders as JSON (given by name or as a list); none for another grader."""
    if not isinstance(grader, dict) or grader.get("type") != "multi":
        return []
    found = grader.get("graders")
    if isinstance(found, dict) and "type" in found:
        found = [found]
    found = found.values() if isinstance(found, dict) else found if isinstance(found, list) else []
    return [g for g in found if isinstance(g, dict)]


Single = Annotated[StringCheck | TextSimilarity | Python | ScoreModel | LabelModel, Field(discriminator="type")]


class Multi(_Grader):
    type: Literal["multi"]
    graders: dict[str, Single]
    calculate_output: str = Field(min_length=1, max_length=4096)

    @field_validator("graders", mode="before")
    @classmethod
    def _named(cls, value):
        if isinstance(value, list):  # a list: each grader under its own name
            return {_name_of(g, str(i)): g for i, g in enumerate(value)}
        if isinstance(value, dict) and "type" in value:  # one grader, as the SDK's type allows
            return {_name_of(value, "grader"): value}
        return value

    @model_validator(mode="after")
    def _formula(self) -> Multi:
        if not self.graders:
            raise ValueError("graders: give at least one")
        _formula_names(self.calculate_output, set(self.graders))
        return self


Grader = Annotated[StringCheck | TextSimilarity | Python | ScoreModel | LabelModel | Multi, Field(discriminator="type")]
_ADAPTER = TypeAdapter(Grader)
TYPES = frozenset({"string_check", "text_similarity", "python", "score_model", "label_model", "multi"})
RUN_BY_WORKER = frozenset({"python", "score_model", "label_model"})  # over the worker's grading socket


def run_by_worker(found: dict[str, dict]) -> list[str]:
    """The fields (of `TrainingSpec.graders`) whose grader, or one of whose sub-graders, the worker runs for the run:
    python graders and judges."""
    return [k for k, g in found.items() if ({g.get("type")} | {s.get("type") for s in sub_graders(g)}) & RUN_BY_WORKER]


def parse(grader: Any) -> StringCheck | TextSimilarity | Python | ScoreModel | LabelModel | Multi:
    """The grader, validated; a `GraderError` naming the first bad field (`grader.FIELD`) otherwise."""
    try:
        return _ADAPTER.validate_python(grader)
    except ValidationError as exc:
        first = exc.errors()[0]
        raw = [str(p) for p in first["loc"]]
        kinds = TYPES
        # pydantic names the union member chosen by `type`: not a field of the request
        loc = [p for i, p in enumerate(raw) if not (p in kinds and (i == 0 or (i >= 2 and raw[i - 2] == "graders")))]
        reason = first["msg"].removeprefix("Value error, ")
        named = re.match(r"(\w+): ", reason)  # a check across fields names its field first
        if named and first["type"] == "value_error":
            loc.append(named.group(1))
            reason = reason[named.end() :]
        if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
            reason = f"type must be one of {', '.join(sorted(kinds))}"
            loc.append("type")
        raise GraderError(reason, ".".join(["grader", *loc])) from None


# -- templates -----------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


@dataclass
class Sample:
    """A model's answer as graders see it."""

    output_text: str
    output_tools: list = field(default_factory=list)

    @property
    def output_json(self) -> Any:
        try:
            return json.loads(self.output_text)
        except ValueError:
            return None


class VariableError(ValueError):
    """A template names something the item or the sample does not have."""


def _lookup(path: str, sample: Sample, item: Any) -> Any:
    parts = path.split(".")
    if parts[0] == "item":
        value = item
    elif parts[0] == "sample" and len(parts) >= 2 and parts[1] in ("output_text", "output_json", "output_tools"):
        value = getattr(sample, parts[1])
        parts = parts[1:]
    else:
        raise VariableError(
            f"{{{{{path}}}}}: use item.FIELD, sample.output_text, sample.output_json or sample.output_tools"
        )
    for part in parts[1:]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise VariableError(f"{{{{{path}}}}}: {part!r} is not there")
    return value


def render(template: str, sample: Sample, item: Any) -> str:
    """`template` with each `{{...}}` replaced: strings as they are, anything else as JSON."""

    def one(match: re.Match) -> str:
        value = _lookup(match.group(1), sample, item)
        return value if isinstance(value, str) else json.dumps(value)

    return _VARIABLE.sub(one, template)


# -- text similarity ------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0 or predicted == 0 or reference == 0:
        return 0.0
    p, r = overlap / predicted, overlap / reference
    return 2 * p * r / (p + r)


def rouge_n(candidate: str, reference: str, n: int) -> float:
    c, r = _ngrams(_words(candidate), n), _ngrams(_words(reference), n)
    return _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))


def rouge_l(candidate: str, reference: str) -> float:
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:  # longest common subsequence, one row at a time
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return _f1(row[-1], len(a), len(b))


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU-4: the geometric mean of clipped n-gram precisions (add-one smoothed above unigrams, Lin and Och
    2004) times the brevity penalty."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        grams, ref = _ngrams(c, n), _ngrams(r, n)
        total, hits = sum(grams.values()), sum((grams & ref).values())
        if n == 1 and hits == 0:
            return 0.0
        logs.append(math.log((hits + (n > 1)) / (total + (n > 1))) if total + (n > 1) else 0.0)
    penalty = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return penalty * math.exp(sum(logs) / max_n)


def gleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Google BLEU (Wu et al. 2016): matched 1..4-grams over the larger of the candidate's and the reference's."""
    c, r = _words(candidate), _words(reference)
    hits = total_c = total_r = 0
    for n in range(1, max_n + 1):
        grams, ref = _ngrams(c, n), _ngrams(r, n)
        hits += sum((grams & ref).values())
        total_c, total_r = total_c + sum(grams.values()), total_r + sum(ref.values())
    return hits / max(total_c, total_r) if max(total_c, total_r) else 0.0


def similarity(metric: str, candidate: str, reference: str) -> float:
    if metric == "fuzzy_match":
        return SequenceMatcher(None, candidate, reference, autojunk=False).ratio()
    if metric == "bleu":
        return bleu(candidate, reference)
    if metric == "gleu":
        return gleu(candidate, reference)
    if metric == "rouge_l":
        return rouge_l(candidate, reference)
    return rouge_n(candidate, reference, int(metric.removeprefix("rouge_")))


# -- multi: a formula over named scores ------------------------------------------------------------

_FUNCTIONS: dict[str, Callable] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
_OPERATORS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
    ast.Mod: lambda a, b: a % b,
}


def _formula_names(formula: str, names: set[str]) -> None:
    """Refuse a formula that is not arithmetic over `names`, numbers and `_FUNCTIONS`."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"calculate_output: does not parse: {exc.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCTIONS:
            raise ValueError(f"calculate_output: {node.id!r} is not one of the graders ({', '.join(sorted(names))})")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
            raise ValueError(f"calculate_output: only {', '.join(_FUNCTIONS)} may be called")
        allowed = (
            ast.Expression,
            ast.BinOp,
            ast.UnaryOp,
            ast.Name,
            ast.Load,
            ast.Call,
            ast.Constant,
            ast.USub,
            ast.UAdd,
            *_OPERATORS,
        )
        if not isinstance(node, allowed) or (
            isinstance(node, ast.Constant) and not isinstance(node.value, int | float)
        ):
            raise ValueError(
                f"calculate_output: {type(node).__name__} is not allowed; use + - * / ** %, numbers, "
                "grader names and min, max, abs, floor, ceil, exp, sqrt, log"
            )


def evaluate_formula(formula: str, scores: dict[str, float]) -> float:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp):
            return _OPERATORS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call):
            return float(_FUNCTIONS[node.func.id](*[ev(a) for a in node.args]))
        raise ValueError(type(node).__name__)

    _formula_names(formula, set(scores))
    return float(ev(ast.parse(formula, mode="eval")))


# -- the python grader's sandbox ------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What an untrusted `grade` may use: seconds of wall and CPU time, address space, processes and open files."""

    seconds: float = 10.0
    memory_bytes: int = 512 << 20
    processes: int = 16
    files: int = 64
    output_bytes: int = 1 << 20


_RUNNER = r"""
import json, os, sys

def _sandbox(scratch):
    allowed_read = tuple(p for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix} if p)
    denied = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.forkpty", "ctypes.", "os.kill", "os.killpg", "pty.", "os.chdir", "os.chroot", "os.putenv",
              "os.unsetenv", "os.symlink", "os.link", "webbrowser.", "urllib.", "gc.get_",
              "function.__new__", "code.__new__", "sys.addaudithook", "cpython.",
              "ftplib.", "smtplib.", "http.", "imaplib.", "poplib.", "nntplib.", "telnetlib.")

    def hook(event, args):
        if event.startswith(denied):
            raise PermissionError(f"not allowed in a grader: {event}")
        if event in ("open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.rmdir",
                     "shutil.rmtree", "os.truncate", "os.chmod", "os.chown", "os.utime"):
            path = args[0]
            if isinstance(path, int):
                return
            real = os.path.realpath(os.fsdecode(path))
            writing = event not in ("open", "os.listdir", "os.scandir") or (len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
            if real == scratch or real.startswith(scratch + os.sep):
                return
            if not writing and event in ("open", "os.listdir", "os.scandir") and real.startswith(allowed_read):
                return
            raise PermissionError(f"not allowed in a grader: {event} {real}")

    sys.addaudithook(hook)

scratch = os.path.realpath(os.getcwd())
request = json.loads(sys.stdin.read())
code = compile(request["source"], "grader.py", "exec")
namespace = {"__name__": "grader"}
_sandbox(scratch)
del _sandbox
try:
    exec(code, namespace)
    score = namespace["grade"](request["sample"], request["item"])
    result = {"score": float(score)}
except BaseException as exc:
    result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
sys.__stdout__.write("\n" + json.dumps(result) + "\n")
sys.__stdout__.flush()
"""


def _limit(limits: Limits) -> Callable[[], None]:
    def preexec() -> None:
        import resource

        os.setsid()
        cpu = max(1, math.ceil(limits.seconds))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.files, limits.files))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.geteuid() == 0:  # root is not bound by RLIMIT_NPROC and may read anything: become nobody, alone
            _unshare_network()
            if _reachable(_interpreter()):
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

    return preexec


NOBODY = 65534
CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")


def _reachable(path: str) -> bool:
    """Whether a user with no rights of its own can run `path` (every folder above it and the file are o+x)."""
    import stat

    p = Path(path)
    try:
        return all(q.stat().st_mode & stat.S_IXOTH for q in [p, *p.parents])
    except OSError:
        return False


def _interpreter() -> str:
    """A Python 3 for the grader's child: this one, or a system one that `nobody` can run (the child needs only the
    standard library), so that a grader started by root runs as nobody."""
    own = os.path.realpath(sys.executable)
    if os.geteuid() != 0 or _reachable(own):
        return own
    return next((os.path.realpath(c) for c in CANDIDATES if _reachable(os.path.realpath(c))), own)


def _unshare_network() -> None:
    """A network namespace of its own (no interface but a down loopback), where the kernel lets us."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x40000000)  # CLONE_NEWNET
    except (OSError, AttributeError):
        pass


@dataclass
class PythonResult:
    score: float | None
    error: str | None = None
    kind: str | None = None  # python_grader_runtime_error, python_grader_server_error (timed out, killed)
    seconds: float = 0.0


def run_python(source: str, sample: dict, item: Any, limits: Limits = Limits()) -> PythonResult:
    """The user's `grade(sample, item)` in a child with no network, no files outside its scratch folder, and the
    limits of `limits`; its score, or why there is none."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prefq-grader-") as scratch:
        os.chmod(scratch, 0o777)  # the child may run as nobody
        runner = Path(scratch) / "runner.py"
        runner.write_text(_RUNNER)
        request = json.dumps({"source": source, "sample": sample, "item": item})
        env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        try:
            proc = subprocess.Popen(
                [_interpreter(), "-I", "-S", str(runner)],  # isolated, no site-packages: the standard library only
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=scratch,
                env=env,
                preexec_fn=_limit(limits),  # noqa: PLW1509 - the limits must be set in the child before exec
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:  # its limits could not be set: it does not run
            return PythonResult(None, f"could not start the grader: {exc}", "python_grader_server_error")
        try:
            out, err = proc.communicate(request.encode(), timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return PythonResult(
                None, f"timed out after {limits.seconds:g} s", "python_grader_server_error", time.monotonic() - started
            )
        finally:
            _kill_group(proc)  # whatever it left behind in its session
    seconds = time.monotonic() - started
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if "score" in result:
        if not math.isfinite(result["score"]):
            return PythonResult(
                None, "grade returned a number that is not finite", "python_grader_runtime_error", seconds
            )
        return PythonResult(result["score"], None, None, seconds)
    if "error" in result:
        return PythonResult(None, result["error"], "python_grader_runtime_error", seconds)
    why = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    if proc.returncode and proc.returncode < 0:
        why = [f"killed by signal {-proc.returncode} (a CPU, memory or file limit)"]
    return PythonResult(None, why[0][:2000], "python_grader_server_error", seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# -- grading --------------------------------------------------------------------------------------

Judge = Callable[[str, list[dict], dict], str]  # (model, messages, sampling params) -> the reply's text
# (source, sample, item, limits) -> the result: `run_python` here, or the same run by a parent with the rights to
# start it as nobody (`training.grpo.socket_python`)
PythonRunner = Callable[[str, dict, Any, Limits], PythonResult]

ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)


# where OpenAI's answer puts the text of each python grader error
DETAILS = {
    "python_grader_runtime_error": "python_grader_runtime_error_details",
    "python_grader_server_error": "python_grader_server_error_type",
}


@dataclass
class Graded:
    """OpenAI's run answer: `reward`, each sub-grader's, what went wrong (flags and details) and the time it took."""

    reward: float
    sub_rewards: dict[str, float]
    errors: dict[str, Any]
    seconds: float
    name: str
    type: str

    @property
    def failed(self) -> bool:
        return any(v for k, v in self.errors.items() if not k.endswith("_details") and not k.endswith("_type"))

    def response(self) -> dict:
        """The body of `POST /v1/fine_tuning/alpha/graders/run`."""
        return {
            "reward": self.reward,
            "sub_rewards": self.sub_rewards,
            "metadata": {
                "name": self.name,
                "type": self.type,
                "errors": self.errors,
                "execution_time": round(self.seconds, 4),
                "scores": self.sub_rewards or {self.name: self.reward},
                "token_usage": None,
                "sampled_model_name": None,
            },
            "model_grader_token_usage_per_model": {},
        }


def _messages(grader: ScoreModel | LabelModel, sample: Sample, item: Any) -> list[dict]:
    out = []
    for m in grader.input:
        content = m.content
        if isinstance(content, str):
            content = render(content, sample, item)
        elif isinstance(content, dict) and isinstance(content.get("text"), str):
            content = render(content["text"], sample, item)
        else:
            content = render(json.dumps(content), sample, item)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _number(text: str) -> float | None:
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            value = value.get("score", value.get("result"))
        return float(value)
    except (ValueError, TypeError):
        found = re.findall(r"-?\d+(?:\.\d+)?", text)
        return float(found[-1]) if found else None


def _one(
    grader, sample: Sample, item: Any, errors: dict, judge: Judge | None, limits: Limits, python: PythonRunner
) -> float:
    """One grader's score; 0 with its error flag set where it cannot give one."""
    try:
        if isinstance(grader, StringCheck):
            a, b = render(grader.input, sample, item), render(grader.reference, sample, item)
            op = grader.operation
            hit = {"eq": a == b, "ne": a != b, "like": b in a, "ilike": b.lower() in a.lower()}[op]
            return float(hit)
        if isinstance(grader, TextSimilarity):
            a, b = render(grader.input, sample, item), render(grader.reference, sample, item)
            return similarity(grader.evaluation_metric, a, b)
        if isinstance(grader, Python):
            found = python(
                grader.source,
                {
                    "output_text": sample.output_text,
                    "output_json": sample.output_json,
                    "output_tools": sample.output_tools,
                },
                item,
                limits,
            )
            if found.score is None:
                errors[found.kind] = True
                errors[DETAILS[found.kind]] = found.error
                return 0.0
            return found.score
        if isinstance(grader, ScoreModel | LabelModel):
            if judge is None:
                errors["model_grader_server_error"] = True
                errors["model_grader_server_error_details"] = "no judge endpoint is configured on this server"
                return 0.0
            try:
                reply = judge(
                    grader.model, _messages(grader, sample, item), getattr(grader, "sampling_params", None) or {}
                )
            except Exception as exc:  # noqa: BLE001 - a judge that is down scores 0 and says why
                errors["model_grader_server_error"] = True
                errors["model_grader_server_error_details"] = f"{type(exc).__name__}: {exc}"[:2000]
                return 0.0
            if isinstance(grader, LabelModel):
                label = reply.strip().strip(".\"'").strip()
                if label not in grader.labels:
                    errors["model_grader_parse_error"] = True
                    return 0.0
                return float(label in grader.passing_labels)
            value = _number(reply)
            if value is None:
                errors["model_grader_parse_error"] = True
                return 0.0
            return min(max(value, grader.range[0]), grader.range[1])
    except VariableError as exc:
        errors["invalid_variable_error"] = True
        errors.setdefault("other_error_details", str(exc))
        return 0.0
    raise TypeError(type(grader).__name__)


def _empty_errors() -> dict:
    return {k: False for k in ERROR_FLAGS} | {
        "model_grader_server_error_details": None,
        "python_grader_runtime_error_details": None,
        "python_grader_server_error_type": None,
    }


def grade(
    grader,
    output_text: str,
    item: Any = None,
    *,
    output_tools: list | None = None,
    judge: Judge | None = None,
    limits: Limits = Limits(),
    python: PythonRunner = run_python,
) -> Graded:
    """Score one sample against one item; never raises for what the grader or the sample does at run time."""
    if not isinstance(grader, BaseModel):
        grader = parse(grader)
    started = time.monotonic()
    sample, errors = Sample(output_text, output_tools or []), _empty_errors()
    item = {} if item is None else item
    if isinstance(grader, Multi):
        subs = {name: _one(g, sample, item, errors, judge, limits, python) for name, g in grader.graders.items()}
        try:
            reward = evaluate_formula(grader.calculate_output, subs)
        except (ValueError, ArithmeticError, TypeError) as exc:
            errors["formula_parse_error"] = True
            errors.setdefault("other_error_details", str(exc))
            reward = 0.0
    else:
        reward, subs = _one(grader, sample, item, errors, judge, limits, python), {}
    if not math.isfinite(reward):
        errors["other_error"], reward = True, 0.0
    return Graded(reward, subs, errors, time.monotonic() - started, grader.name, grader.type)
