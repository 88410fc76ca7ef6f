"""`shardkv status`: the health of the cluster serving DIR (or of a backend's URL), as a table,
JSON or the Prometheus text format; `--watch` redraws it in place, `--serve PORT` serves it on
http://127.0.0.1:PORT/metrics for a scraper.

Exit codes: 0 healthy, 1 degraded, 2 down or not running, 5 no store at DIR.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from datetime import timedelta

import shardkv
from shardkv.backends import backend_for, is_url, scheme_of
from shardkv.cli.common import UsageError, console, port, seconds
from shardkv.ops.cluster import find_store, read_health, realdir
from shardkv.ops.exitcodes import FAILED, NOT_RUNNING, OK
from shardkv.ops.status import collect_status, stale_objects

SAMPLE_SECONDS = 0.25  # ops/s is measured over this long
COLUMNS = ("role", "shard", "pid", "state", "uptime", "restarts", "keys", "live", "total", "garbage", "segs", "waiting", "ops/s", "fsync age", "in doubt")


# -- reading -----------------------------------------------------------------------------------
def local_status(directory) -> dict:
    """The status object of the store in `directory` (ops/status.py `collect_status`, with
    "directory"), or {"status": "not running", "exit_code": 2, "directory", "stale_objects"}.
    StoreNotFound if `directory` holds no store and no killed cluster's leftovers. Never starts
    a cluster."""
    path = realdir(directory)
    if read_health(path) is None:
        stale = len(stale_objects(path))  # a killed cluster's leftovers (`shardkv stop` removes them)
        if not stale:
            find_store(path)  # a mistyped path says so, rather than "not running"
        return {"status": "not running", "exit_code": NOT_RUNNING, "directory": path, "stale_objects": stale}
    with shardkv.open(path, create=False) as db:
        status = collect_status(db, sample_seconds=SAMPLE_SECONDS)
    return dict(status, directory=path)


def backend_health(target: str) -> dict:
    """The health object of a backend's URL (e.g. a Redis Cluster's nodes), opening no store
    where the backend can say it without one."""
    backend = backend_for(scheme_of(target))
    if callable(getattr(backend, "health", None)):
        return backend.health(target)
    with backend.open(target) as db:
        return db.health()


# -- rendering ---------------------------------------------------------------------------------
def _size(value) -> str:
    from rich.filesize import decimal  # noqa: PLC0415

    return "-" if value is None else decimal(value)


def _cells(entry: dict) -> list[str]:
    shard = entry["role"] == "shard"

    def figure(name: str, fmt=str) -> str:
        value = entry.get(name)
        return "-" if not shard or value is None else fmt(value)

    return [
        entry["role"],
        str(entry["shard"]) if shard else "-",
        str(entry["pid"] or "-"),
        entry["state"] + (" (compacting)" if entry.get("compacting") else ""),
        str(timedelta(seconds=round(entry["uptime"]))) if entry.get("uptime") else "-",
        str(entry["restarts"]),
        figure("keys", lambda v: f"{v:,}"),
        figure("live_bytes", _size),
        figure("total_bytes", _size),
        figure("garbage_ratio", lambda v: f"{v:.0%}"),
        figure("segments"),
        figure("waiting"),
        "-" if entry.get("ops_per_second") is None else f"{entry['ops_per_second']:,.1f}",
        figure("last_fsync_age", lambda v: f"{v:.1f}s"),
        figure("in_doubt"),
    ]


def status_table(status: dict):
    """The status object as a rich renderable: the directory, `status: ...`, one row per process."""
    from rich.console import Group  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    if status["status"] == "not running":
        stale = status.get("stale_objects")
        line = f"not running, {stale} stale objects: {status['directory']} (`shardkv stop` removes them)" if stale else f"not running: {status['directory']}"
        return Text(line)
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name in COLUMNS:
        table.add_column(name, no_wrap=True, justify="left" if name in ("role", "state") else "right")
    sup = status["supervisor"]
    table.add_row("supervisor", "-", str(sup["pid"] or "-"), sup["state"], *["-"] * (len(COLUMNS) - 4))
    for entry in [status["coordinator"], *status["shards"]]:
        if entry:
            table.add_row(*_cells(entry))
    return Group(Text(status.get("directory", "")), Text(f"status: {status['status']}"), table)


def render(target: str, output: str) -> tuple[object, int]:
    """(what to print: a str, or a rich renderable for the table; exit code) of one reading of
    `target` in `output` format."""
    if is_url(target):  # the backend renders its own health (docs/BACKENDS.md, "Adding a backend")
        from shardkv.backends import _redacted  # noqa: PLC0415

        backend = backend_for(scheme_of(target))
        health = backend_health(target)
        code = int(health.get("exit_code", FAILED))
        if output == "json":
            return json.dumps(dict(health, target=_redacted(target)), indent=2), code
        if output == "prometheus":
            return backend.render_prometheus(health).rstrip("\n"), code
        return f"{_redacted(target)}\n{backend.render_table(health)}", code
    status = local_status(target)
    if output == "json":
        return json.dumps(status, indent=2), status["exit_code"]
    if output == "prometheus":
        from shardkv.ops.metrics import render_prometheus  # noqa: PLC0415

        return render_prometheus(status).rstrip("\n"), status["exit_code"]
    return status_table(status), status["exit_code"]


def _show(out, renderable) -> None:
    """Print one reading: text as it is (JSON, exposition: no rich markup, no wrapping), a
    table through rich."""
    if isinstance(renderable, str):
        print(renderable, flush=True)
    else:
        from rich.console import Console  # noqa: PLC0415
        from rich.measure import Measurement  # noqa: PLC0415

        # As wide as the table needs, even past a narrow terminal (which then wraps the lines):
        # rich would otherwise squeeze the columns into "supervi…". (print(width=) cannot widen.)
        needed = Measurement.get(out, out.options.update_width(1000), renderable).maximum
        if needed > out.width:
            out = Console(file=out.file, width=needed, force_terminal=out.is_terminal, no_color=out.no_color, highlight=False)
        out.print(renderable, crop=False)
        out.file.flush()


# -- the command -------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    """`shardkv status TARGET [--json | --format F] [--watch [S] | --serve PORT]`."""
    output = args.format
    if args.json:
        if output not in ("table", "json"):
            raise UsageError(f"--json and --format {output} say different things")
        output = "json"
    if args.serve is not None:
        if args.watch is not None:
            raise UsageError("--serve and --watch do not go together (a scraper polls by itself)")
        return serve(args.target, args.serve)
    out = console()
    renderable, code = render(args.target, output)
    if not args.watch:
        _show(out, renderable)
        return code
    try:
        if not out.is_terminal:  # a log or a pipe: one reading after another
            while True:
                _show(out, renderable)
                time.sleep(args.watch)
                renderable, code = render(args.target, output)
        from rich.live import Live  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        def drawable(reading):
            return Text(reading) if isinstance(reading, str) else reading

        with Live(drawable(renderable), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                renderable, code = render(args.target, output)
                live.update(drawable(renderable), refresh=True)
    except KeyboardInterrupt:  # the way out of --watch: the last reading's code
        return code


def _scrape(target: str):
    """What one scrape shows: the status object (or a backend's exposition text); an error
    is reported on stderr and shown as shardkv_status_code 6 rather than failing the scrape."""
    try:
        if is_url(target):
            health = backend_health(target)
            return backend_for(scheme_of(target)).render_prometheus(health)
        return local_status(target)
    except Exception as exc:  # noqa: BLE001 — the exporter keeps serving; the scraper sees the code
        print(f"shardkv: scrape of {target} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {"status": "error", "exit_code": FAILED}


def serve(target: str, port_number: int) -> int:
    """Serve `target`'s metrics on http://127.0.0.1:PORT/metrics until SIGTERM or SIGINT."""
    from shardkv.ops.metrics import serve as serve_metrics  # noqa: PLC0415

    if not is_url(target):
        local_status(target)  # a path with no store fails now, not at every scrape
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server = serve_metrics(lambda: _scrape(target), port_number)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve on 127.0.0.1:{port_number}: {exc.strerror}") from None
        print(f"serving http://127.0.0.1:{server.server_port}/metrics (SIGTERM or Ctrl-C stops)", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.shutdown()
            server.server_close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return OK


def register(commands) -> None:
    """Add status to the `shardkv` parser's subcommands."""
    status = commands.add_parser(
        "status", help="show every process and shard of the cluster serving DIR (exit 0 healthy, 1 degraded, 2 down)",
        description="Show the supervisor, the coordinator and every shard of the cluster serving DIR (or the nodes of a "
        "backend's URL). Never starts a cluster. Exit 0 healthy, 1 degraded, 2 down or not running, 5 no store at DIR.",
    )  # fmt: skip
    status.add_argument("target", metavar="DIR", help="the data directory (or a backend's URL, e.g. redis://host:port)")
    status.add_argument("--json", action="store_true", help="print the status (the object db.health() returns) as JSON")
    status.add_argument("--format", choices=("table", "json", "prometheus"), default="table", help="output format (default: table)")
    status.add_argument("--watch", type=seconds, nargs="?", const=2.0, default=None, metavar="SECONDS", help="redraw in place every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--serve", type=port, default=None, metavar="PORT", help="serve the Prometheus metrics on http://127.0.0.1:PORT/metrics (0: any free port) until SIGTERM")
    status.set_defaults(handler=cmd_status)
