"""The images, proven from their files (no Docker here): each installs exactly its lock file with --no-deps, so
the lock is the image's requirement set; the API's has no torch; the locks agree with pyproject.toml; the
dependencies are a layer below the code; the user is not root; .dockerignore keeps the rest out."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploycheck.code import Problems

IMAGES = {
    "deploy/Dockerfile.api": "deploy/requirements-api.txt",
    "deploy/Dockerfile.worker": "deploy/requirements-worker.txt",
}
EXTRAS = {"deploy/Dockerfile.api": [], "deploy/Dockerfile.worker": ["train", "deepspeed"]}
PYTHON = {
    "python_version": "3.11",
    "python_full_version": "3.11.18",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
}


def read_lock(path: Path) -> dict[str, str]:
    """name -> version of a `name==version` lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line.rstrip("\\").strip())
            pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
        if not m.group(0).lstrip().startswith("#")
    ]


def pip_installs(run: str) -> list[list[str]]:
    """The arguments of every `pip install` / `uv pip install` in a RUN line."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in [*lexer, ";"]:
        if token in ("&&", "||", ";", "|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c[i + 2 :] for c in commands for i in range(len(c) - 1) if c[i : i + 2] == ["pip", "install"]]


def copy_sources(args: str) -> list[str]:
    """The sources of a COPY instruction (all but its destination, flags left out)."""
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


def closure(requirements: list[Requirement], pins: dict[str, str], lock: str, problems: Problems) -> None:
    """Every package that the requirements need (their extras and markers followed through the installed
    packages' metadata, where this environment has the locked version) is in the lock."""
    todo = [(req, "pyproject.toml") for req in requirements]
    seen = set()
    while todo:
        req, needed_by = todo.pop()
        name = canonicalize_name(req.name)
        for extra in req.extras or {""}:
            key = (name, extra)
            if key in seen:
                continue
            seen.add(key)
            if name not in pins:
                problems.add(lock, f"{req.name} (needed by {needed_by}) is not in the lock")
                break
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            if dist.version != pins[name]:
                continue
            for dep in map(Requirement, dist.requires or []):
                env = {**default_environment(), **PYTHON, "extra": extra}
                if dep.marker is None or dep.marker.evaluate(env):
                    todo.append((dep, f"{req.name}{f'[{extra}]' if extra else ''}"))


def check_lock(dockerfile: str, lock: str, project: dict, pins: dict[str, str], problems: Problems) -> None:
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in EXTRAS[dockerfile]:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for req in requirements:
        name = canonicalize_name(req.name)
        if name in pins and pins[name] not in req.specifier:
            problems.add(
                lock,
                f"pins {req.name}=={pins[name]}, pyproject.toml wants {req}: regenerate it with the "
                "command in its header",
            )
    closure(requirements, pins, lock, problems)
    if not EXTRAS[dockerfile]:  # the API image: nothing of the training stack
        training = {
            canonicalize_name(Requirement(r).name)
            for extra in ("train", "deepspeed")
            for r in project["optional-dependencies"][extra]
        } | {"torch"}
        for name, version in sorted(pins.items()):
            if name in training or name.startswith(("nvidia-", "triton")):
                problems.add(lock, f"{name}=={version} would put the training stack (torch) into the API image")


def check_dockerfile(root: Path, dockerfile: str, lock: str, project: dict, problems: Problems) -> None:
    steps = instructions(root / dockerfile)
    packages = [p.name for p in root.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"]
    first_code = next(
        (i for i, (op, args) in enumerate(steps) if op == "COPY" and set(copy_sources(args)) & set(packages)), None
    )
    deps_at = None
    for i, (op, args) in enumerate(steps):
        if op != "RUN":
            continue
        for install in pip_installs(args):
            targets = [a for a in install if not a.startswith("-")]
            if "--no-deps" not in install:
                problems.add(
                    dockerfile,
                    f"`pip install {shlex.join(install)}` resolves dependencies itself: with "
                    f"--no-deps the image holds exactly {lock}",
                )
            if "-r" in install:
                deps_at = i if deps_at is None else deps_at
            for target in targets:
                if target.startswith(".") and "[" in target and not EXTRAS[dockerfile]:
                    problems.add(dockerfile, f"installs {target}: the API image takes no extras")
                if target == "." and "-e" not in install:
                    declared = set(project.get("tool", {}).get("setuptools", {}).get("packages", []))
                    missing = sorted(
                        {
                            ".".join(p.parent.relative_to(root).parts)
                            for pkg in packages
                            for p in (root / pkg).rglob("__init__.py")
                        }
                        - declared
                    )
                    if missing:
                        problems.add(
                            dockerfile,
                            f"`pip install .` leaves out {', '.join(missing)} (pyproject's "
                            "[tool.setuptools] packages): install it editable (-e .)",
                        )
    copied = [src for op, args in steps if op == "COPY" and "--from" not in args for src in copy_sources(args)]
    if not any(Path(src).name == Path(lock).name for src in copied) or deps_at is None:
        problems.add(dockerfile, f"does not install its dependencies from {lock}")
    elif first_code is not None and deps_at > first_code:
        problems.add(
            dockerfile, "copies the code before it installs the dependencies: every code change would reinstall them"
        )
    users = [args for op, args in steps if op == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.add(dockerfile, "runs as root: end with a USER that is not root (a numeric uid)")
    check_dockerignore(root, copied, problems)


def ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (its last matching pattern decides)."""
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            out = not negate
    return out


def check_dockerignore(root: Path, copied: list[str], problems: Problems) -> None:
    path = root / ".dockerignore"
    if not path.is_file():
        problems.add(".dockerignore", "is missing: the venv, caches and run data would go into the build context")
        return
    patterns = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for kept_out in (".venv/bin/python", ".git/HEAD", ".prefq/prefq.db", "runs/x"):
        if not ignored(patterns, kept_out):
            problems.add(".dockerignore", f"lets {kept_out.split('/')[0]} into the build context")
    for source in copied:
        if ignored(patterns, source.strip("./") or "."):
            problems.add(".dockerignore", f"keeps out {source}, which a Dockerfile copies")


def check(root: Path, problems: Problems) -> None:
    project_file = tomllib.loads((root / "pyproject.toml").read_text())
    project = {**project_file["project"], "tool": project_file.get("tool", {})}
    locks = {}
    for dockerfile, lock in IMAGES.items():
        locks[lock] = read_lock(root / lock)
        check_lock(dockerfile, lock, project, locks[lock], problems)
        check_dockerfile(root, dockerfile, lock, project, problems)
    api, worker = locks.values()
    for name in sorted(set(api) & set(worker)):
        if api[name] != worker[name]:
            problems.add(
                "deploy/requirements-worker.txt",
                f"{name}=={worker[name]}, the API image has {api[name]}: both images run the same code",
            )
