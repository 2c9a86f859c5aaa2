"""The record of one ``bench/gpu_check.sh`` run, and the check of what it leaves for the device tool to bring back.

Plain Python, no torch: it must work when the install step failed.

    python bench/gpu_check_record.py record RUN_DIR STEPS_TSV STATUS SECONDS MODE
        writes RUN_DIR/gpu_check.json (atomically): the machine (from RUN_DIR/env.json, written by the env step),
        each step's exit status, duration and cap, the overall status, and the files of the run folder.
    python bench/gpu_check_record.py check-out DIR
        exit 1 unless DIR holds what the device tool brings back whole: at most 8 files, at most 2 folders down,
        names of letters, digits, '.', '_' and '-', each file at most 16 MiB and all of them at most 64 MiB.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys

MAX_FILES = 8
MAX_DEPTH = 2  # folders below DIR
MAX_FILE_BYTES = 16 << 20
MAX_TOTAL_BYTES = 64 << 20
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_steps(path: str) -> list[dict]:
    steps = []
    with open(path) as f:
        for line in f:
            name, rc, seconds, cap = line.rstrip("\n").split("\t")
            exit_status = rc if rc == "skipped" else int(rc)
            steps.append({"step": name, "exit": exit_status, "seconds": int(seconds), "cap_s": int(cap),
                          "timed_out": exit_status in (124, 137)})
    return steps


def files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def record(run_dir: str, steps_file: str, status: str, seconds: str, mode: str) -> dict:
    env_path = os.path.join(run_dir, "env.json")
    try:
        with open(env_path) as f:
            env = json.load(f)
    except (OSError, ValueError) as e:
        env = {"error": f"no machine record ({env_path}: {e})"}
    rec = {
        "schema": "cnnperf.gpu_check/1",
        "mode": mode,  # "gpu": the real check; "rehearsal": the same steps on a CPU, tiny sizes
        "device": env.get("device"),
        "env": env,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": int(status),
        "seconds": int(seconds),
        "steps": read_steps(steps_file),
        "files": [f for f in files_under(run_dir) if f != "gpu_check.json"],
    }
    write_json_atomic(os.path.join(run_dir, "gpu_check.json"), rec)
    return rec


def check_out(root: str) -> list[str]:
    """What would not come back from ``root`` (one line each); empty when everything would."""
    problems, total, files = [], 0, files_under(root)
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, at most {MAX_FILES} come back: {', '.join(files)}")
    for rel in files:
        parts = rel.split(os.sep)
        if len(parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: {len(parts) - 1} folders down, at most {MAX_DEPTH} come back")
        bad = [p for p in parts if not NAME.match(p)]
        if bad:
            problems.append(f"{rel}: name {bad[0]!r} has characters other than letters, digits, '.', '_', '-'")
        size = os.path.getsize(os.path.join(root, rel))
        total += size
        if size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {size / 2**20:.1f} MiB, at most {MAX_FILE_BYTES >> 20} MiB a file")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all, at most {MAX_TOTAL_BYTES >> 20} MiB")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[0] == "record":
        rec = record(*argv[1:])
        failed = [s["step"] for s in rec["steps"] if s["exit"] != 0]
        print(f"gpu_check.json: status {rec['status']}, {len(rec['steps'])} steps"
              + (f", not passed: {', '.join(failed)}" if failed else ", all passed"))
        return 0
    if len(argv) == 2 and argv[0] == "check-out":
        problems = check_out(argv[1])
        for p in problems:
            print(f"check-out: {p}", file=sys.stderr)
        files = files_under(argv[1])
        if not problems:
            print(f"check-out: {len(files)} files under {argv[1]}, all within the device tool's limits")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
