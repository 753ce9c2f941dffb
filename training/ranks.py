"""The ranks of a distributed run forked from the run itself, where it was forked warm (`training.warm`): each rank
starts with torch, transformers, TRL and the trainers imported, instead of importing them again behind `accelerate
launch` and torchrun (about 5 s of CPU per rank, and the launcher's own start).

Each rank gets the environment that `accelerate launch` would give it, from accelerate's own functions on the same
config file (`training.launch.command`), and torchrun's rank variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT ...). The run process is the ranks' supervisor, as `training.launch` is of the launcher: the ranks are in
sessions of their own and die with it (PDEATHSIG); SIGTERM goes to them, a second SIGTERM kills them; when a rank
fails the others get SIGTERM, then SIGKILL after GRACE_S (as torchrun does); the exit code is rank 0's. Rank 0 writes
the events on the run's own event stream.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from training.events import event_stream
from training.parent import die_with_parent

GRACE_S = 30.0  # a failed rank's peers get this long after SIGTERM before SIGKILL (torchrun's default)


def rank_envs(cmd: list[str], env: dict, ranks: int) -> list[dict]:
    """Each rank's environment: `env` (the launch's), what `accelerate launch` adds from its config, and torchrun's
    rank variables."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(cmd[2:])  # as `accelerate launch` parses its command line
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config) if defaults else []
        if mixed_precision_from_config:
            args.deepspeed_fields_from_accelerate_config.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(args.deepspeed_fields_from_accelerate_config)
    saved = dict(os.environ)
    try:  # accelerate builds on os.environ: the launch's environment, then restored
        os.environ.clear()
        os.environ.update(env)
        added = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    common = {**env, **added, "MASTER_ADDR": str(args.main_process_ip), "MASTER_PORT": str(args.main_process_port)}
    return [
        common
        | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "ROLE_RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks),
            "ROLE_WORLD_SIZE": str(ranks),
            "GROUP_WORLD_SIZE": "1",
        }
        for rank in range(ranks)
    ]


def _rank(env: dict, argv: list[str]) -> None:
    """In a forked rank: become what torchrun would have started, run, and exit with the run's code."""
    code = 1
    try:
        os.setsid()  # as torchrun's ranks: the run's process group is signalled, the ranks are told by the run
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        os.dup2(event_stream().fileno(), 1)  # `claim_stdout` takes it back for the events
        import torch

        import training.events

        training.events._IS_MAIN = env["RANK"] == "0"  # read from RANK when the server imported it
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or torch.get_num_threads()))
        from training.__main__ import main

        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a rank reports and exits; its supervisor sees the code
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def fork_ranks(cmd: list[str], env: dict, ranks: int, code_file: Path) -> int:
    """Fork the ranks of `cmd` (`accelerate launch ... -m training run ...`) and supervise them; rank 0's exit code."""
    envs = rank_envs(cmd, env, ranks)
    argv = cmd[cmd.index("training") + 1 :]  # after `-m training`: run SPEC --out DIR [--resume]
    sys.stdout.flush()
    sys.stderr.flush()
    event_stream().flush()
    pids: list[int] = []
    for rank_env in envs:
        pid = os.fork()
        if pid == 0:
            die_with_parent(signal.SIGKILL)  # the run supervises; if it dies, its ranks die with it
            _rank(rank_env, argv)
        pids.append(pid)
    received: list[int] = []
    codes: dict[int, int] = {}

    def signal_ranks(sig: int) -> None:
        for pid in pids:
            if pid not in codes:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def forward(signum, frame):
        received.append(signum)
        signal_ranks(signal.SIGKILL if len(received) > 1 else signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    kill_at = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if kill_at is not None and time.monotonic() > kill_at:
                signal_ranks(signal.SIGKILL)
                kill_at = None
            time.sleep(0.05)
            continue
        if pid not in pids:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if codes[pid] not in (0, 75) and len(codes) < len(pids) and kill_at is None and not received:
            print(f"rank {pids.index(pid)} exited with {codes[pid]}: stopping the others", file=sys.stderr)
            signal_ranks(signal.SIGTERM)
            kill_at = time.monotonic() + GRACE_S
    if code_file.is_file():
        return int(code_file.read_text())
    rc = codes[pids[0]]
    return rc if rc >= 0 else 128 - rc
