"""A run across several nodes, placed by Ray: the launcher that `python -m training run` becomes for `nodes` > 1.

1. A placement group named after the job and the attempt (`spec.cluster.name`): one bundle of `gpus / nodes` devices
   (GPUs, or CPUs on a CPU cluster) per node, STRICT_SPREAD, so every node is a different Ray node. It is placed
   whole or not at all (gang placement); not placed within `placement_timeout_s`, the run says so (`unplaced`)
   and ends with EXIT_STOPPED before anything has started: the worker queues the job again with that reason, for
   a later attempt. A SIGTERM while it waits ends the wait at once.
2. One actor per bundle. Each starts its node's ranks as `python -m training run` processes in their own session,
   with the environment `accelerate launch` would give a rank (`training.ranks.rank_envs`), their global ranks, and
   the first node's address as `MASTER_ADDR`. A rank dies with its actor (a node lost, or the launcher killed and
   its actors with it by Ray), so that none outlives its node. Rank 0 writes its events to a file in the run's
   folder, which this launcher relays to its own stdout: the worker follows them as a one-node run's.
3. SIGTERM (cancel, pause, the worker's shutdown) is passed to every rank: they save a checkpoint and stop. A node
   lost (its actor dead) stops the others and ends the run with EXIT_STOPPED, so that the worker hands the job back
   and the next attempt resumes from the newest complete checkpoint. Rank 0's `error` events are held until the
   run's end is known: a rank fails when its peer's node is lost, and that is no failure of the job.

The run's folder must be one that every node and the worker see (a shared volume: `deploy/k8s`); on one machine,
as in the tests, it is. The exit code is rank 0's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from training.events import emit, event_stream, read_event
from training.parent import die_with_parent
from training.spec import EXIT_STOPPED, EXIT_USER_ERROR, TrainingSpec

POLL_S = 0.2
EVENTS = "rank0-events.jsonl"
STOP_GRACE_S = 60.0  # after SIGTERM, the ranks' time to save a checkpoint before SIGKILL


def _rank_envs(spec: TrainingSpec, spec_path: str, out_dir: Path, resume: bool) -> tuple[list[str], list[dict]]:
    """The ranks' command and each global rank's environment (before the first node's address is known)."""
    from training.launch import command
    from training.ranks import rank_envs

    cmd, env = command(spec, spec_path, out_dir, resume)
    per_node = spec.gpus // spec.nodes
    envs = []
    for rank, rank_env in enumerate(rank_envs(cmd, env, spec.gpus)):
        node, local = divmod(rank, per_node)
        envs.append(
            rank_env
            | {
                "LOCAL_RANK": str(local),
                "GROUP_RANK": str(node),
                "LOCAL_WORLD_SIZE": str(per_node),
                "GROUP_WORLD_SIZE": str(spec.nodes),
                "OMP_NUM_THREADS": rank_env.get("OMP_NUM_THREADS") or "1",
            }
        )
    argv = [sys.executable, "-m", "training", "run", spec_path, "--out", str(out_dir)] + (
        ["--resume"] if resume else []
    )
    return argv, envs


def _node_actor():
    import ray

    @ray.remote
    class Node:
        """One node's ranks: started, polled and signalled from the launcher."""

        def __init__(self):
            self.procs: list[subprocess.Popen] = []

        def address(self) -> str:
            return ray.util.get_node_ip_address()

        def start(self, argv: list[str], envs: list[dict], events: str | None, cwd: str) -> list[int]:
            for env in envs:
                with open(events if env.get("RANK") == "0" and events else os.devnull, "wb") as out:
                    self.procs.append(
                        subprocess.Popen(
                            argv,
                            env=env,
                            cwd=cwd,
                            stdout=out,  # the rank holds its own copy
                            stderr=None,
                            start_new_session=True,
                            preexec_fn=lambda: die_with_parent(signal.SIGKILL),  # a rank dies with its node
                        )
                    )
            return [p.pid for p in self.procs]

        def poll(self) -> list[int | None]:
            return [p.poll() for p in self.procs]

        def signal(self, sig: int) -> None:
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass

    return Node


class _Relay:
    """Rank 0's event lines, as they are written, to this process's stdout; its `error` events are held back
    until `release` (the run ended of itself) or dropped (a node was lost: the next attempt resumes)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.held = path, 0, b"", []

    def pump(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        stream = event_stream()
        for line in lines:
            text = line.decode(errors="replace")
            if not text.strip():
                continue
            try:
                kind = read_event(text)[0]
            except ValueError:
                kind = None
            if kind == "error":
                self.held.append(text)
            else:
                stream.write(text + "\n")
        stream.flush()

    def release(self) -> None:
        self.pump()
        stream = event_stream()
        for text in self.held:
            stream.write(text + "\n")
        stream.flush()


def launch_nodes(spec: TrainingSpec, spec_path: str, out_dir: Path, resume: bool) -> int:
    """Place the run's nodes, start their ranks, relay rank 0's events; rank 0's exit code."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cluster = spec.cluster
    if cluster is None:
        emit("error", code="no_cluster", message="nodes: no Ray cluster was given to the run", user_error=True)
        return EXIT_USER_ERROR
    out_dir.mkdir(parents=True, exist_ok=True)
    stopping = {"signal": None}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(signal=signal.SIGTERM))
    per_node = spec.gpus // spec.nodes
    cuda = bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    bundle = {"GPU": per_node} if cuda else {"CPU": per_node}
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    emit("placing", nodes=spec.nodes, bundle=bundle, timeout_s=cluster.placement_timeout_s, name=cluster.name)
    group = placement_group([bundle] * spec.nodes, strategy="STRICT_SPREAD", name=cluster.name)
    nodes = []
    try:
        deadline = time.monotonic() + cluster.placement_timeout_s
        placed = False
        while not placed and stopping["signal"] is None and (left := deadline - time.monotonic()) > 0:
            placed = group.wait(min(1.0, left))
        if stopping["signal"] is not None:
            return EXIT_STOPPED  # cancelled, paused or shut down before anything started
        if not placed:
            free = sum(1 for n in ray.nodes() if n["Alive"])
            emit(
                "unplaced",
                message=f"waiting for {spec.nodes} nodes of {bundle} each on the Ray cluster ({free} alive): none "
                f"placed within {cluster.placement_timeout_s:g} s, nothing was started",
            )
            return EXIT_STOPPED
        emit("placed", nodes=spec.nodes, name=cluster.name)
        Node = _node_actor()
        nodes = [
            Node.options(
                num_cpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote()
            for i in range(spec.nodes)
        ]
        master = ray.get(nodes[0].address.remote())
        argv, envs = _rank_envs(spec, spec_path, out_dir, resume)
        events = out_dir / EVENTS
        events.unlink(missing_ok=True)
        for i, node in enumerate(nodes):
            mine = [e | {"MASTER_ADDR": master} for e in envs[i * per_node : (i + 1) * per_node]]
            ray.get(node.start.remote(argv, mine, str(events) if i == 0 else None, os.getcwd()))
        return _supervise(nodes, _Relay(events), stopping, RayActorError)
    finally:
        for node in nodes:
            try:
                ray.get(node.signal.remote(signal.SIGKILL), timeout=10)
            except Exception:  # noqa: BLE001 - a node already gone has nothing left to kill
                pass
            ray.kill(node)
        remove_placement_group(group)
        ray.shutdown()


def _supervise(nodes, relay: _Relay, stopping: dict, actor_error) -> int:
    """Relay events until every rank has exited; SIGTERM passed on; a lost node ends the run to be resumed."""
    import ray

    told, kill_at = False, None
    while True:
        relay.pump()
        if stopping["signal"] is not None and not told:
            told, kill_at = True, time.monotonic() + STOP_GRACE_S
            for node in nodes:
                node.signal.remote(signal.SIGTERM)
        if kill_at is not None and time.monotonic() > kill_at:
            for node in nodes:
                node.signal.remote(signal.SIGKILL)
            kill_at = None
        try:
            codes = ray.get([node.poll.remote() for node in nodes], timeout=30)
        except (actor_error, ray.exceptions.GetTimeoutError) as exc:
            relay.pump()  # what rank 0 said before; its errors are dropped
            print(f"a node of the run was lost ({type(exc).__name__}: {exc}); handed back", file=sys.stderr)
            return EXIT_STOPPED  # handed back: the next attempt resumes from the newest complete checkpoint
        flat = [c for node_codes in codes for c in node_codes]
        if all(c is not None for c in flat):
            relay.release()
            return flat[0]
        if any(c not in (None, 0) for c in flat) and not told:  # a rank failed: the others cannot go on
            told, kill_at = True, time.monotonic() + 30
            for node in nodes:
                node.signal.remote(signal.SIGTERM)
        time.sleep(POLL_S)
