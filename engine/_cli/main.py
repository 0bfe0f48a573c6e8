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

__all__ = ["main", "build_parser"]


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", metavar="SPEC", default=None,
                   help="local (default), threads, local-cuda, tcp://host:port or "
                        "scheduler-file:PATH")
    g.add_argument("--n-workers", type=int, default=None, help="worker processes (local clusters)")
    g.add_argument("--threads-per-worker", type=int, default=None)
    g.add_argument("--memory-limit", default=None, help="per worker, e.g. 4GiB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cube-engine",
        description="Distributed machine learning on Earth-observation and climate data cubes.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job spec (jobs/*.yaml) on a cluster")
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
    _add_cluster_args(run)

    val = sub.add_parser("validate", help="check a job spec, its catalog entry and variables")
    val.add_argument("job")
    val.add_argument("--output", metavar="URL")
    val.add_argument("--overwrite", action="store_true")

    cat = sub.add_parser("catalog", help="inspect Intake catalogs")
    csub = cat.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    cl = csub.add_parser("list", help="list the entries of a catalog")
    cl.add_argument("catalog")
    cs = csub.add_parser("show", help="dims, variables, chunks, sizes and provenance of an entry")
    cs.add_argument("catalog")
    cs.add_argument("entry")
    cs.add_argument("--json", action="store_true", help="print JSON")

    bench = sub.add_parser("bench", help="run the benchmarks (see benchmarks/README.md)")
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--size", default="default", choices=["tiny", "default", "large"])
    bench.add_argument("--tag", default=None, help="suffix of the results files (e.g. h100)")
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


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.io.destination import check_destination
    from engine.pipelines.gapfill import output_locations, prepare, spec_fingerprint
    from engine.pipelines.spec import load_job

    spec = load_job(args.job)
    p = prepare(spec)
    url, run_dir = output_locations(spec, args.output)
    from engine._version import code_version

    fingerprint = {"job": spec_fingerprint(spec), "code_version": code_version(),
                   "input": f"{spec.input.catalog}#{spec.input.entry}"}
    check_destination(url, fingerprint=fingerprint,
                      overwrite=args.overwrite, restart=False,
                      storage_options=spec.output.storage_options, must_resume=False)
    print(f"ok: {args.job} ({spec.kind}) target {spec.target} from {', '.join(spec.features)}; "
          f"cube {dict(p.ds.sizes)}; output {url}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from engine.cluster import cluster_summary, connect
    from engine.pipelines.gapfill import run_gapfill
    from engine.pipelines.spec import load_job

    con = _console()
    spec = load_job(args.job)
    # Validate everything that can be validated without a cluster first: nothing is
    # written and no cluster starts for a bad spec.
    cmd_validate_ns = argparse.Namespace(job=args.job, output=args.output,
                                         overwrite=args.overwrite or args.restart)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        cmd_validate(cmd_validate_ns)
    t0 = time.perf_counter()
    client = connect(args.cluster, n_workers=args.n_workers,
                     threads_per_worker=args.threads_per_worker, memory_limit=args.memory_limit)
    with client:
        info = cluster_summary(client)
        con.print(f"cluster: {info['n_workers']} workers, {info['threads']} threads"
                  + (f", {info['gpus']} GPUs" if info["gpus"] else "")
                  + f"; dashboard: {info['dashboard'] or 'off'}")
        report_cm = contextlib.nullcontext()
        if args.report:
            from distributed import performance_report

            report_cm = performance_report(filename=args.report)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            console=con, disable=args.quiet, transient=False)
        with report_cm, progress:
            epochs = progress.add_task("training", total=spec.train.epochs, info="")
            regions: dict[str, Any] = {}

            def on_epoch(rec):
                progress.update(epochs, advance=1,
                                info=f"train {rec['train_loss']:.4f} val {rec['val_loss']:.4f}")

            def on_region(done, total, **_):
                if "task" not in regions:
                    regions["task"] = progress.add_task("writing", total=total, info="regions")
                progress.update(regions["task"], completed=done, total=total)

            res = run_gapfill(spec, output=args.output, overwrite=args.overwrite,
                              restart=args.restart, client=client, on_epoch=on_epoch,
                              on_region=on_region, log=lambda s: progress.console.print(s))
            progress.update(epochs, total=progress.tasks[epochs].completed or 1)
    m = res.metrics
    t = Table(title=f"{spec.name}: test blocks ({m['test']['model']['n']:,} cells)")
    for col in ("model", "RMSE", "MAE", "R2"):
        t.add_column(col, justify="right" if col != "model" else "left")
    for name in ("model", "ols", "train_mean"):
        s = m["test"][name]
        label = {"model": f"{spec.model.kind} ({', '.join(spec.features)})",
                 "ols": "least squares", "train_mean": "training mean"}[name]
        t.add_row(label, f"{s['rmse']:.4f}", f"{s['mae']:.4f}", f"{s['r2']:.4f}")
    con.print(t)
    tp = res.throughput
    w = res.write
    summary = {
        "output": res.output_url,
        "run_dir": res.run_dir,
        "files": res.files,
        "cells_filled": m["cells_filled"],
        "regions_written": getattr(w, "n_written", None),
        "regions_skipped": getattr(w, "n_skipped", None),
        "wall_s": time.perf_counter() - t0,
        "cluster": info,
        **tp,
    }
    con.print(f"output: {res.output_url}  (regions written {summary['regions_written']}, "
              f"skipped {summary['regions_skipped']})")
    con.print(f"metrics: {res.files['metrics']}  maps: {res.files['map_plot']}  "
              f"loss: {res.files['loss_plot']}")
    con.print(f"throughput: train {tp.get('train_samples_per_s') or 0:,.0f} samples/s; "
              f"write {tp.get('output_pixels_per_s') or 0:,.0f} output px/s, "
              f"{tp.get('mb_per_s_written') or 0:.1f} MB/s; total {summary['wall_s']:.1f} s")
    if not args.quiet and tp.get("phases"):
        con.print(throughput_table(tp["phases"]))
    if args.report:
        with open(args.report + ".json", "w") as f:
            json.dump(summary, f, indent=2, default=str)
        con.print(f"report: {args.report} (dask performance report), {args.report}.json "
                  "(this summary)")
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


def cmd_bench(args: argparse.Namespace) -> int:
    import sys

    from engine.errors import EngineError

    # the benchmarks live in the checkout, next to engine/, not in the installed package
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for where in (os.getcwd(), root):
        if os.path.isfile(os.path.join(where, "benchmarks", "__main__.py")):
            if where not in sys.path:
                sys.path.insert(0, where)
            break
    else:
        raise EngineError("benchmarks are run from a checkout: cd to the repository root")
    from benchmarks.__main__ import main as bench_main

    return bench_main([*args.names, "--size", args.size]
                      + (["--tag", args.tag] if args.tag else []))


def main(argv: list[str] | None = None) -> int:
    from engine.errors import EngineError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "catalog":
            return cmd_catalog(args)
        if args.command == "bench":
            return cmd_bench(args)
    except EngineError as err:
        if args.debug:
            raise
        print(f"cube-engine: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cube-engine: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
