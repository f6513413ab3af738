"""Instructions per ``GET /v1/projects/{id}``: tenantctl vs the plain FastAPI + asyncpg baseline.

``bench api`` measures throughput, which on a small, shared machine moves by
+-20% from one round to the next. This counts what the same request costs the
server process in executed instructions, under valgrind's callgrind: nearly the same
number from run to run (repeat runs differed by ~0.6% per request), so a change
of a few percent is seen.

Each app runs in ``bench.asgi_driver``: the request goes straight into its ASGI
app (no HTTP parsing, no load generator), after a warm-up. The per-request cost
is ``(Ir(N requests) - Ir(0 requests)) / N``, which cancels start-up and
warm-up. Not counted: the kernel's part of system calls, cache misses, and
PostgreSQL's side (``bench api`` reports its CPU). BENCH_API_AB_TREE=/other/checkout
adds that tree's tenantctl, as in ``bench api``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.api import AB_TREE, api_world
from bench.common import embedded_stack

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = int(os.environ.get("BENCH_INSTRUCTION_REQUESTS", "2000"))
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def _instructions(kind: str, tree: str | None, count: int, env: dict[str, str]) -> int:
    """Instructions executed by one driver process of ``count`` requests."""
    with tempfile.TemporaryDirectory(prefix="tcbench-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        paths = [str(ROOT)]
        if tree is not None:
            # The other tree's packages, this tree's driver (-P: no implicit cwd on sys.path).
            packages = Path(tmp) / "ab"
            packages.mkdir()
            for name in ("data_plane", "control_plane"):
                (packages / name).symlink_to(Path(tree).resolve() / name)
            paths.insert(0, str(packages))
        driver = [sys.executable, "-P", "-m", "bench.asgi_driver", kind, str(count)]
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *driver],
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(paths)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"driver {kind} ({tree or 'this tree'}) failed:\n{proc.stderr.decode()[-2000:]}")
        total = _TOTAL.search(out.read_bytes())
        if total is None:
            raise RuntimeError(f"no instruction total in callgrind's output for {kind}")
        return int(total.group(1))


def run() -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        return {"skipped": True, "summary": "skipped: valgrind is not installed (Debian: apt-get install valgrind)"}
    servers: dict[str, tuple[str, str | None]] = {"tenantctl": ("tenantctl", None), "baseline": ("baseline", None)}
    if AB_TREE:
        servers["tenantctl_ab"] = ("tenantctl", AB_TREE)
    with embedded_stack() as (stack, endpoints):
        path, token, env = api_world(stack, endpoints)
        env |= {"BENCH_DRIVER_PATH": path, "BENCH_DRIVER_TOKEN": token}
        jobs = [(name, count) for name in servers for count in (0, REQUESTS)]
        # Two at a time: each driver is one busy process, and PostgreSQL needs little.
        with ThreadPoolExecutor(max_workers=2) as pool:
            totals = dict(
                zip(jobs, pool.map(lambda job: _instructions(*servers[job[0]], job[1], env), jobs), strict=True)
            )
    per_request = {name: round((totals[name, REQUESTS] - totals[name, 0]) / REQUESTS) for name in servers}
    ratio = per_request["tenantctl"] / per_request["baseline"]
    return {
        "benchmark": "GET /v1/projects/{id}: instructions per request in the server process, tenantctl vs baseline",
        "setup": {"requests": REQUESTS, "tool": "valgrind --tool=callgrind", "driver": "bench.asgi_driver"},
        "instructions_per_request": per_request,
        "ratio_to_baseline": round(ratio, 3),
        **({"ab": {"tree": AB_TREE}} if AB_TREE else {}),
        "summary": f"{per_request['tenantctl']:,} vs {per_request['baseline']:,} instructions per request "
        f"({ratio:.2f}x the baseline)" + (f"; {AB_TREE}: {per_request['tenantctl_ab']:,}" if AB_TREE else ""),
    }
