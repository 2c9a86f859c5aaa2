"""Agreement between the ranks of a torch.distributed run (torchrun, DDP), so that all ranks take the same path:
every rank measures the same variants in the same order, each variant's rows are gathered and the slowest
rank's times count (a data-parallel step waits for all ranks), and every other choice (a budget check, the list
of variants) is rank 0's. Without torch.distributed (``world == 1``) nothing is communicated. Imports torch only.
"""

from __future__ import annotations

import torch


def dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_and_rank() -> tuple[int, int]:
    """(world size, this rank): (1, 0) without torch.distributed."""
    if not dist_on():
        return 1, 0
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def agree(value, world: int):
    """Rank 0's ``value`` on every rank (identity without torch.distributed)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value, world: int) -> list:
    """Every rank's ``value``, in rank order (``[value]`` without torch.distributed)."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def gather_row(row: dict, world: int) -> dict:
    """The row as all ranks saw it: the slowest rank's times, failed if any rank failed."""
    if world == 1:
        return row
    rows = all_gather(row, world)
    failed = next((r for r in rows if r["status"] != "ok"), None)
    if failed is not None:
        rank = rows.index(failed)
        return {**failed, "error": f"rank {rank}: {failed.get('error') or failed.get('reason')}"}
    slowest = max(rows, key=lambda r: r["median_ms"])
    medians = [r["median_ms"] for r in rows]
    checks = [r.get("check") for r in rows if r.get("check")]
    merged = dict(slowest)
    if checks:
        merged["check"] = max(checks, key=lambda c: (not c["passed"], c["grad_err"]))
    merged["ranks"] = {"median_ms": medians, "spread": max(medians) / min(medians) - 1 if min(medians) > 0
                       else None}
    return merged
