"""The ``cube-engine`` command line: thin verbs over the engine's functions.

Every :class:`engine.errors.EngineError` becomes one line on stderr and exit code 2
(``--debug`` shows the traceback). ``main(argv)`` is what the tests call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from engine._cli.cluster_args import add_cluster_arguments, connect_kwargs

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cube-engine",
        description="Distributed machine learning on Earth-observation and climate data cubes.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    # --debug is accepted after the subcommand too (``cube-engine run JOB --debug``)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job spec (jobs/*.yaml) on a cluster",
                         parents=[common])
    run.add_argument("job", help="job spec YAML, e.g. jobs/gapfill.yaml")
    run.add_argument("--output", metavar="URL", help="output store URL (overrides the spec)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing output store with different content")
    run.add_argument("--restart", action="store_true",
                     help="recompute everything even where a previous run finished")
    run.add_argument("--report", metavar="PATH",
                     help="save dask's performance report (HTML) and the throughput summary "
                          "(PATH.json)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a spec field: dotted key, YAML "
                     "value (--set train.epochs=3 --set split.blocks='{lat: 5, lon: 5}')")
    add_cluster_arguments(run)

    val = sub.add_parser("validate", parents=[common],
                         help="check a job spec, its catalog entry, variables, dims, sizes and "
                              "destinations without starting a cluster")
    val.add_argument("job")
    val.add_argument("--output", metavar="URL")
    val.add_argument("--overwrite", action="store_true")
    val.add_argument("--restart", action="store_true")
    val.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a spec field, as for run")
    val.add_argument("--offline", action="store_true",
                     help="check the spec and its catalog entry without opening the data "
                          "(for jobs whose data is remote)")

    cat = sub.add_parser("catalog", help="inspect Intake catalogs", parents=[common])
    csub = cat.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    cl = csub.add_parser("list", help="list the entries of a catalog", parents=[common])
    cl.add_argument("catalog")
    cs = csub.add_parser("show", parents=[common],
                         help="dims, variables, chunks, sizes and provenance of an entry")
    cs.add_argument("catalog")
    cs.add_argument("entry")
    cs.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("jobs", parents=[common], help="list the job kinds (kind: in a job file)")

    from engine._cli import verify as _verify

    _verify.add_parser(sub, parents=[common])
    from engine._cli import deploy as _deploy

    _deploy.add_parser(sub, parents=[common])
    return parser


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def cmd_catalog(args: argparse.Namespace) -> int:
    from rich.table import Table

    from engine.io.catalog import describe_entry, list_entries

    con = _console()
    if args.catalog_command == "list":
        entries = list_entries(args.catalog)
        t = Table(title=f"{args.catalog}", show_lines=False)
        for col in ("entry", "kind", "description"):
            t.add_column(col)
        for e in entries:
            t.add_row(str(e.get("name")), str(e.get("reader", e.get("driver", ""))),
                      str(e.get("description", ""))[:90])
        con.print(t)
        return 0
    info = describe_entry(args.catalog, args.entry)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        sys.stdout.flush()  # a closed pipe raises here, inside main's handler
        return 0
    con.print(f"[bold]{args.entry}[/bold]  ({args.catalog})")
    for key in ("description", "url", "nbytes", "n_chunks"):
        if key in info:
            val = _fmt_bytes(info[key]) if key == "nbytes" else info[key]
            con.print(f"  {key}: {val}")
    if "dims" in info:
        con.print("  dims: " + ", ".join(f"{k}={v}" for k, v in info["dims"].items()))
    if "chunks" in info:
        con.print("  chunks: " + ", ".join(f"{k}={v}" for k, v in info["chunks"].items()))
    if info.get("variables"):
        t = Table(show_header=True)
        for col in ("variable", "dims", "dtype", "units", "long name"):
            t.add_column(col)
        for name, v in info["variables"].items():
            t.add_row(name, ",".join(v.get("dims", [])), str(v.get("dtype", "")),
                      str(v.get("units", "")), str(v.get("long_name", "")))
        con.print(t)
    prov = info.get("provenance") or {}
    if prov:
        con.print("  provenance:")
        for k, v in prov.items():
            con.print(f"    {k}: {str(v)[:120]}")
    return 0


def _plan(spec: Any, args: argparse.Namespace, must_resume: bool) -> Any:
    """The job kind's plan (cube, destinations, resume identity), made without a cluster."""
    from engine.pipelines.registry import get_kind

    kind = get_kind(spec.kind)
    if kind.plan is None:
        return None
    return kind.plan(spec, args.output, overwrite=args.overwrite,
                     restart=getattr(args, "restart", False), must_resume=must_resume)


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.pipelines.spec import load_job

    spec = load_job(args.job, getattr(args, "overrides", ()))
    if getattr(args, "offline", False):
        from engine.io.catalog import read_entry

        if not spec.input.catalog:  # a kind that makes its own input (embed's synthetic fields)
            print(f"ok (offline: spec only, no catalog entry): {args.job} ({spec.kind})")
            return 0
        entry = read_entry(spec.resolve(spec.input.catalog), spec.input.entry)
        print(f"ok (offline: spec and catalog entry only, data not opened): {args.job} "
              f"({spec.kind}) entry {spec.input.entry} at {entry.to_dict()['url']}")
        return 0
    plan = _plan(spec, args, must_resume=False)
    what = plan.describe() if plan is not None else "spec parsed (this kind plans in its run)"
    print(f"ok: {args.job} ({spec.kind}) {what}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from engine.cluster import cluster_summary, connect
    from engine.pipelines.registry import get_kind
    from engine.pipelines.spec import load_job

    con = _console()
    cluster_kwargs = connect_kwargs(args)  # bad cluster flags: one line, before anything
    if args.report:
        _check_writable_file(args.report, "--report")
        _check_writable_file(args.report + ".json", "--report")
    spec = load_job(args.job, args.overrides)
    # Check everything that can be checked without a cluster first: nothing is written
    # and no cluster starts for a bad spec; the run uses this plan, not a second one.
    plan = _plan(spec, args, must_resume=True)
    t0 = time.perf_counter()
    client = connect(**cluster_kwargs)
    with client:
        info = cluster_summary(client)
        con.print(f"cluster: {info['n_workers']} workers, {info['threads']} threads"
                  + (f", {info['gpus']} GPUs" if info["gpus"] else "")
                  + (" (TLS)" if info.get("tls") else "")
                  + f"; dashboard: {info['dashboard'] or 'off'}")
        report_cm: Any = contextlib.nullcontext()
        if args.report:
            from distributed import performance_report

            # inline bokeh resources: the report renders without internet
            report_cm = performance_report(filename=args.report, mode="inline")
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(),  # ETA, e.g. over a whole archive (apply)
                            console=con, disable=args.quiet, transient=False)
        with report_cm, progress:
            epochs = progress.add_task("training", total=getattr(plan, "epochs", None),
                                       info="")
            regions: dict[str, Any] = {}

            def on_epoch(rec):
                fold = f"fold {rec['fold']}: " if "fold" in rec else ""
                progress.update(epochs, advance=1, info=f"{fold}train {rec['train_loss']:.4f} "
                                                        f"val {rec['val_loss']:.4f}")

            def on_region(done, total, **_):
                if "task" not in regions:
                    regions["task"] = progress.add_task("writing", total=total, info="regions")
                progress.update(regions["task"], completed=done, total=total)

            res = get_kind(spec.kind).run(
                spec, plan=plan, output=args.output, overwrite=args.overwrite,
                restart=args.restart, client=client, on_epoch=on_epoch, on_region=on_region,
                log=lambda s: progress.console.print(s))
            progress.update(epochs, total=progress.tasks[epochs].completed or 1)
    summary = print_result(con, res, wall=time.perf_counter() - t0, quiet=args.quiet)
    summary["cluster"] = info
    if args.report:
        with open(args.report + ".json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
        con.print(f"report: {args.report} (dask performance report), {args.report}.json "
                  "(this summary)")
    return 0


def print_result(con: Any, res: Any, *, wall: float, quiet: bool = False) -> dict[str, Any]:
    """Print a :class:`engine.pipelines.job.JobResult`: the kind's table (one row per model
    or baseline), where it wrote, the run folder and the throughput; return the summary
    that ``--report PATH.json`` saves."""
    from rich.table import Table

    rep, tp, w = res.report, res.throughput, res.write
    t = Table(title=rep.title)
    for i, col in enumerate(rep.columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rep.rows:
        t.add_row(*row)
    con.print(t)
    con.print("; ".join([f"output: {res.output_url}  (regions written {w.n_written}, "
                         f"skipped {w.n_skipped})", *rep.notes]))
    names = [os.path.basename(f) for f in res.files.values() if os.path.exists(f)]
    con.print(f"run folder: {res.run_dir}  ({', '.join(names)})")
    rates = []
    if res.trained and tp.get("train_samples_per_s"):
        rates.append(f"train {tp['train_samples_per_s']:,.0f} samples/s")
    if w.n_written:
        px = tp.get("output_pixels_per_s")
        pixels = f"{px:,.0f} output px/s, " if px else ""
        rates.append(f"write {pixels}{tp.get('mb_per_s_written') or 0:.1f} MB/s")
    if not rates:
        rates.append("nothing new to compute (resumed: model reused, every region finished)")
    con.print(f"throughput: {'; '.join(rates)}; total {wall:.1f} s")
    if not quiet and tp.get("phases") and (res.trained or w.n_written):
        con.print(throughput_table(tp["phases"]))
    return {"output": res.output_url, "run_dir": res.run_dir, "files": res.files,
            **rep.summary, "regions_written": w.n_written, "regions_skipped": w.n_skipped,
            "trained": res.trained, "wall_s": wall, **tp}


def _check_writable_file(path: str, flag: str) -> None:
    """One line now, not a traceback after the whole run, when ``path`` cannot be written.
    A file that did not exist is removed again."""
    from engine.errors import SpecError

    existed = os.path.exists(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a folder", path)
        with open(path, "a"):
            pass
    except OSError as err:
        raise SpecError(f"{flag} {path}: cannot write there ({err.strerror or err}); give a "
                        "file in a writable folder") from None
    if not existed:
        os.remove(path)


def cmd_jobs(args: argparse.Namespace) -> int:
    from engine.pipelines.registry import job_kinds

    for name, kind in sorted(job_kinds().items()):
        print(f"{name:<12} {kind.summary} [{kind.source}]")
    return 0


def throughput_table(phases: dict[str, Any]) -> Any:
    """Rich table of :meth:`engine.meter.Meter.summary` phases: all workers, each worker
    and each GPU, with rates over the phase's wall time (patches are counted where they
    are cut: once per chunk when the training stream caches them)."""
    from rich.table import Table

    t = Table(title="throughput per worker (rates over each phase's wall time)")
    for col in ("phase", "worker", "tasks", "patch/s", "px/s", "MB/s in", "MB/s out", "busy"):
        t.add_column(col, justify="left" if col in ("phase", "worker") else "right")

    def si(x: float) -> str:  # compact, so the table fits 80 columns
        return f"{x:,.0f}" if x < 1e4 else f"{x / 1e3:,.0f}k" if x < 1e6 else f"{x / 1e6:,.1f}M"

    def row(phase: str, who: str, r: dict[str, Any]) -> None:
        busy = r.get("busy_share")
        t.add_row(phase, who, f"{r['tasks']:,}", si(r["patches_per_s"]),
                  si(r["output_pixels_per_s"]), f"{r['mb_per_s_read']:,.1f}",
                  f"{r['mb_per_s_written']:,.1f}", "" if busy is None else f"{busy:.0%}")

    for name, ph in phases.items():
        row(f"{name}\n{ph['wall_s']:.1f} s", "all", ph["total"])
        for addr, r in ph["workers"].items():
            label = (":" + addr.rsplit(":", 1)[-1] if "://" in addr else addr) \
                + (f" [{', '.join(r['gpus'])}]" if r["gpus"] else "")
            row("", label, r)
        for gpu, r in ph["gpus"].items():
            row("", f"GPU {gpu.split(':', 1)[-1]}", r)
    return t


def main(argv: list[str] | None = None) -> int:
    from engine.errors import EngineError
    from engine.redact import redact_text

    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "validate": cmd_validate, "catalog": cmd_catalog,
                "verify": _run_verify, "jobs": cmd_jobs, "deploy": _run_deploy}
    try:
        return commands[args.command](args)
    except EngineError as err:
        if args.debug:
            raise
        print(f"cube-engine: error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        print("cube-engine: error: out of memory: use smaller chunks (input.chunks), a "
              "smaller batch size or more workers", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``| head``): stop quietly, like other command-line tools
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("cube-engine: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _run_verify(args: argparse.Namespace) -> int:
    from engine._cli import verify

    return verify.run(args)


def _run_deploy(args: argparse.Namespace) -> int:
    from engine._cli import deploy

    return deploy.cmd_deploy(args)


if __name__ == "__main__":
    raise SystemExit(main())
