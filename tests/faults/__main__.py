"""Soak: `python -m tests.faults --minutes N [--dir DIR] [--seed S]` runs rounds of the fault
harness until N minutes have passed and prints kills survived, operations verified and
anomalies found (exit 1 if any)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

from .harness import Harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--round-seconds", type=float, default=60.0, help="length of one round (a fresh store each)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to put the stores (default: a temporary directory)")
    args = parser.parse_args(argv)
    base = args.dir or tempfile.mkdtemp(prefix="shardkv-faults-")
    totals = {"rounds": 0, "kills": 0, "operations_verified": 0, "anomalies": 0, "fault_points_fired": 0}
    end = time.monotonic() + args.minutes * 60
    round_number = 0
    try:
        while time.monotonic() < end:
            seconds = min(args.round_seconds, max(10.0, end - time.monotonic()))
            seed = None if args.seed is None else args.seed + round_number
            report = Harness(f"{base}/round-{round_number}", seconds, args.clients, seed).run()
            round_number += 1
            totals["rounds"] += 1
            totals["kills"] += report["kills_total"]
            totals["operations_verified"] += report["operations_verified"]
            totals["anomalies"] += len(report["anomalies"])
            totals["fault_points_fired"] += len(report["fault_points_fired"])
            print(json.dumps(report), flush=True)
            shutil.rmtree(f"{base}/round-{round_number - 1}", ignore_errors=True)
            shutil.rmtree(f"{base}/round-{round_number - 1}-oracle", ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"soak: {totals['rounds']} rounds, {totals['kills']} kills survived, {totals['fault_points_fired']} fault points fired, "
          f"{totals['operations_verified']} operations verified, {totals['anomalies']} anomalies")
    return 1 if totals["anomalies"] else 0


if __name__ == "__main__":
    sys.exit(main())
