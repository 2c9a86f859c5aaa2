"""What the tests that start 2 CPU processes on gloo share: a free port, joining the group in a worker, and a
``cnnperf`` command under torchrun."""

import datetime
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int, **env: str) -> None:
    """Join the gloo group of WORLD processes as ``rank`` (``env``: more environment variables), one thread per
    process (two processes on a 2-core machine). A rank that dies makes mp.spawn end the other; the timeout
    bounds any collective that waits for it anyway."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def torchrun_cnnperf(*args: str) -> subprocess.CompletedProcess:
    """``cnnperf *args`` under torchrun on WORLD CPU processes (reference backend unless the environment says
    otherwise, one thread each); fails the test unless it exits 0 without a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("CNNPERF_BACKEND", "reference")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--standalone", "-m", "cnnperf", *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc
