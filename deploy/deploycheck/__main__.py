"""`deploy/check [--root DIR]`: every check, every problem printed with where it is; exit 1 if there is any.

--root checks the deployment files of another tree (the tests' broken copies) against this checkout's code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploycheck import compose, images, k8s
from deploycheck.code import Problems


def main() -> int:
    parser = argparse.ArgumentParser(prog="deploy/check", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    root = parser.parse_args().root.resolve()
    for name in [n for n in os.environ if n.startswith("PREFQ_")]:
        del os.environ[name]  # the files are checked, not this shell's settings
    problems = Problems()
    rendered, objects = k8s.check(root, problems)
    compose_version = compose.check(root, problems)
    images.check(root, problems)
    for problem in problems.items:
        print(f"deploy/check: {problem}")
    if problems.items:
        print(f"deploy/check: {len(problems.items)} problem(s)")
        return 1
    print(
        f"deploy/check: ok: {', '.join(rendered)} rendered ({objects} objects; kubernetes-validate --strict "
        f"{k8s.KUBERNETES_VERSION}, KEDA schema); compose.yaml (Compose {compose_version}); images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
