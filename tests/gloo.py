"""What the tests that start 2 CPU processes on gloo share: a free port, and joining the group in a worker."""

import datetime
import os
import socket

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
