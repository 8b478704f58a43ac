"""``llm-ft train --nproc N``: run the same command as N data-parallel processes on this machine.

No process management of ours: the command re-executes itself under the framework's own
launcher, which starts the ranks, wires them together and stops them all when one fails.
torch: ``python -m torch.distributed.run --nproc-per-node N --standalone -m common.cli train ...``;
mlx: ``mlx.launch -n N --backend ring -- python -m common.cli train ...`` (ranks over 127.0.0.1).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from common.errors import UserError

SHUTDOWN_S = 300  # seconds the ranks get, after Ctrl-C, to checkpoint before the launcher kills them


def without_nproc(args: list[str]) -> list[str]:
    """``args`` less ``--nproc N`` / ``--nproc=N`` (each rank is one process)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launcher_command(backend: str, nproc: int, train_args: list[str]) -> list[str]:
    rank_cmd = ["-m", "common.cli", *train_args]
    if backend == "torch":
        # after a Ctrl-C torchrun gives the ranks this long to finish their step and checkpoint (its default: 30 s)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
                "--shutdown-timeout", str(SHUTDOWN_S), *rank_cmd]
    if backend == "mlx":
        script = Path(sys.executable).with_name("mlx.launch")
        launch = [str(script)] if script.exists() else [
            sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
        return [*launch, "-n", str(nproc), "--backend", "ring", "--", sys.executable, *rank_cmd]
    raise UserError(f"--nproc: the {backend} backend has no data-parallel launcher")


def relaunch(backend: str, nproc: int, argv: list[str] | None = None) -> int:
    """Run this ``train`` command under the launcher; its exit status (the failed rank's, if one failed)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["train"]:
        raise UserError("--nproc works from the command line (llm-ft train ... --nproc N); from Python, "
                        "start your script with torchrun or mlx.launch instead")
    cmd = launcher_command(backend, nproc, without_nproc(args))
    print(f"launching {nproc} processes: {' '.join(cmd[:6])} ...", file=sys.stderr)
    failed: list[str] = []
    code = _run_teeing(cmd, failed, nproc)
    if code == INTERRUPTED:
        return code
    if code not in (0, 130):
        from common.train.loop import resume_command

        who = f"rank {failed[0]}" if failed else "a process"
        print(f"error: {who} of the {nproc}-process job failed (exit status {code}; its output is above) and the "
              f"launcher stopped the others; continue from the last checkpoint with: {resume_command(Path('.'))}",
              file=sys.stderr)
    return code


# torchrun's failure summary: "  rank      : 1 (local_rank: 1)"; mlx.launch: "... rank 1 ..."
_RANK = re.compile(r"^\s*(?:\[\d+\]:\s*)?rank\s*:\s*(\d+)|\brank (\d+)\b")


_NODE = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")


INTERRUPTED = 130
# what torchrun / mlx.launch print while they stop on a signal: their own tracebacks and logs, not the user's concern
_NOISE = re.compile(r"^(\s|Traceback|\w+(\.\w+)+(Error|Exception)\b|[WEI]\d{4} |\[[WE]\d{4}|W\d{4}|.*elastic)")


def _run_teeing(cmd: list[str], failed: list[str], nproc: int = 1) -> int:
    """Run ``cmd``, passing its stderr through and noting the rank its failure report names.

    The launcher runs in its own session, so a Ctrl-C in the terminal reaches this process alone; it is
    passed to the launcher once per press, which passes it to every rank: they finish the step together,
    rank 0 writes a checkpoint and prints the resume command, and this returns 130 (the launcher's own
    shutdown report is not shown)."""
    from common.train.loop import NPROC_ENV

    env = {**os.environ, NPROC_ENV: str(nproc)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True, env=env)
    interrupted = []

    def forward(signum, frame) -> None:
        interrupted.append(signum)
        proc.send_signal(signal.SIGINT)

    old = signal.signal(signal.SIGINT, forward)
    try:
        code = _tee(proc, failed, interrupted)
    finally:
        signal.signal(signal.SIGINT, old)
    return INTERRUPTED if interrupted else code


def _tee(proc: subprocess.Popen, failed: list[str], interrupted: list[int]) -> int:
    named, nodes, root = [], [], False
    for line in proc.stderr:
        if interrupted and _NOISE.match(line):
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
        root = root or "Root Cause" in line  # torchrun names the first rank to fail after this
        if (n := _NODE.search(line)) and n.group(2) != "0":
            nodes.append((n.group(1), int(n.group(2))))
        elif m := _RANK.search(line):
            named.append((not root, m.group(1) or m.group(2)))
    code = proc.wait()
    if nodes:  # mlx.launch stops the other ranks when one dies, but exits 0: the first to end names it
        failed.append(nodes[0][0])
        return code or (nodes[0][1] if nodes[0][1] > 0 else 128 - nodes[0][1])  # -9: killed, 137
    if named:
        failed.append(min(named)[1] if any(not late for late, _ in named) else named[0][1])
    return code
