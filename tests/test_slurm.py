"""``--cluster slurm`` against a real single-node SLURM (tier ``-m slurm``).

The daemons come from the session fixture ``slurm`` (tests/conftest_slurm.py): Debian's
slurmctld, slurmd and munged on 127.0.0.1, started for this session and torn down
after it. Worker jobs ask for one core and 2 GiB each, so two fit next to each other.
Without slurmdbd, ``sacct`` has no database: finished jobs are read from SLURM's job
completion log (jobcomp/filetxt), running ones from ``squeue``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import dask
import pytest
import xarray as xr

from engine.io import writer
from engine.testing.faults import count_computations, counting_cube

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGIONS = {"time": 4, "lat": 5, "lon": 4}  # one dask chunk per region: 12 regions
WORKER = "cube-engine-worker"  # the job name engine.hpc gives worker jobs


def _settings(site, tmp_path) -> dict[str, str]:
    """engine.cluster.slurm.* for the test partition: small jobs, loopback, TLS."""
    return {
        "queue": site.partition,
        "cores": "1",
        "memory": "2GiB",
        "walltime": "00:20:00",
        "scale": "2",
        "interface": "lo",
        "log-directory": str(tmp_path / "logs"),
        "shared-directory": str(tmp_path / "shared"),
        "worker-timeout": "3m",
    }


def _new_jobs(site, before: set[str]) -> list[dict[str, str]]:
    return [j for j in site.completed_jobs() if j["JobId"] not in before]


def test_gapfill_demo_runs_on_slurm_workers(slurm, tmp_path, run_cli):
    """cube-engine run jobs/gapfill.yaml --cluster slurm: every task on workers that SLURM
    started (two worker jobs, TLS), the filled store verified, the jobs gone afterwards."""
    before = {j["JobId"] for j in slurm.completed_jobs()}
    env = dict(slurm.env, **{"DASK_ENGINE__CLUSTER__SLURM__" + k.upper().replace("-", "_"): v
                             for k, v in _settings(slurm, tmp_path).items()})
    env["DASK_DISTRIBUTED__LOGGING__DISTRIBUTED"] = "info"  # the job logs name the workers
    out, report = str(tmp_path / "filled.zarr"), str(tmp_path / "report.html")
    done = subprocess.run(
        [sys.executable, "-m", "engine", "run", "jobs/gapfill.yaml", "--cluster", "slurm",
         "--output", out, "--report", report, "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    # the run starts once the first worker job is up (the second may still be queued)
    assert re.search(r"cluster: [12] workers, [12] threads \(TLS\)", done.stdout), done.stdout

    summary = json.load(open(report + ".json"))
    assert summary["cluster"]["tls"] and summary["cluster"]["n_workers"] >= 1
    assert summary["regions_written"] > 0
    # every worker that did work is one of the SLURM jobs' workers: their addresses are
    # the ones the job logs registered
    logs = tmp_path / "logs"
    job_logs = {p.name: p.read_text() for p in logs.iterdir() if p.suffix == ".err"}
    assert len(job_logs) == 2, sorted(os.listdir(logs))
    started = set()
    for text in job_logs.values():
        assert "Registered to:" in text and "tls://127.0.0.1:" in text, text[-2000:]
        started |= {line.split("Start worker at:")[1].split()[0]
                    for line in text.splitlines() if "Start worker at:" in line}
    workers = {addr for phase in summary["phases"].values() for addr in phase["workers"]}
    assert workers and workers <= started, (workers, started)

    # SLURM's own records: two worker jobs of the test partition, ended by the client
    # closing the cluster (scancel), none left in the queue
    deadline = time.monotonic() + 30
    while len(_new_jobs(slurm, before)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    jobs = _new_jobs(slurm, before)
    assert [(j["Name"], j["Partition"], j["JobState"]) for j in jobs] == \
        [(WORKER, slurm.partition, "CANCELLED")] * 2
    assert not [j for j in slurm.queue() if j["Name"] == WORKER]

    code, stdout, _ = run_cli(["verify", out])
    assert code == 0 and f"all {summary['regions_written']} regions intact" in stdout, stdout


def _job_of(client, cluster, address: str) -> str:
    name = client.scheduler_info(n_workers=-1)["workers"][address]["name"]
    # a job with several processes names its workers NAME-0, NAME-1, ...
    job = cluster.workers.get(name) or cluster.workers[str(name).rsplit("-", 1)[0]]
    return str(job.job_id)


def test_worker_job_cancelled_mid_write_loses_nothing(slurm, tmp_path, monkeypatch, run_cli):
    """scancel of the worker job that is writing: the scheduler reschedules its regions on
    the other job's worker, every region is written once, bit for bit as a clean run."""
    from engine.cluster import connect

    reference = str(tmp_path / "reference.zarr")
    with dask.config.set(scheduler="threads"):
        writer.write(counting_cube(tmp_path / "ref-work"), reference, region_chunks=REGIONS)

    monkeypatch.setenv("SLURM_CONF", slurm.conf)  # sbatch/scancel of dask-jobqueue
    work, url = tmp_path / "work", str(tmp_path / "out.zarr")
    settings = {f"engine.cluster.slurm.{k}": v for k, v in _settings(slurm, tmp_path).items()}
    before = {j["JobId"] for j in slurm.completed_jobs()}
    with dask.config.set(settings), connect("slurm") as client:
        cluster = client.cluster
        client.wait_for_workers(2, timeout=180)
        cancelled: dict[str, str] = {}

        def progress(done: int, total: int) -> None:
            # the first time some regions are finished and others running: cancel the
            # job of a worker that is computing one right now
            if cancelled or not 2 <= done < total - 4:
                return
            busy = [a for a, keys in client.processing().items() if keys]
            if busy:
                job = _job_of(client, cluster, busy[0])
                slurm.run("scancel", job)
                cancelled.update(job=job, address=busy[0], at=str(done))

        ds = counting_cube(work, sleep=1.0)
        res = writer.write(ds, url, region_chunks=REGIONS, client=client, progress=progress)
        assert cancelled, "no worker was busy mid-write: nothing was cancelled"
        survivors = set(client.scheduler_info(n_workers=-1)["workers"])
        assert cancelled["address"] not in survivors  # SLURM really killed that worker

    assert res.n_written == res.n_regions == 12
    ids = sorted(writer.read_manifest(url))
    assert len(ids) == 12 == len(set(ids))  # each region recorded once
    assert count_computations(work) >= 12
    xr.testing.assert_identical(xr.open_zarr(url).compute(), xr.open_zarr(reference).compute())
    code, stdout, _ = run_cli(["verify", url])
    assert code == 0 and "all 12 regions intact" in stdout, stdout

    deadline = time.monotonic() + 30
    while len(_new_jobs(slurm, before)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    states = {j["JobId"]: j["JobState"] for j in _new_jobs(slurm, before)}
    assert states.get(cancelled["job"]) == "CANCELLED", (cancelled, states)
    assert len(states) == 2


def test_deploy_slurm_script_runs_the_job_in_one_allocation(slurm, tmp_path, run_cli):
    """The script of cube-engine deploy slurm, submitted with sbatch: scheduler, worker
    (srun) and cube-engine run in one job that completes with the store written."""
    venv_bin = os.path.dirname(sys.executable)
    out, script = str(tmp_path / "filled.zarr"), tmp_path / "run.sbatch"
    with dask.config.set({"engine.cluster.slurm.cores": 2, "engine.cluster.slurm.memory": "4GiB",
                          "engine.cluster.slurm.processes": 1,
                          "engine.cluster.slurm.job-script-prologue":
                              [f"export PATH={venv_bin}:$PATH"],
                          "engine.cluster.slurm.job-extra-directives": []}):
        code, _, err = run_cli(["deploy", "slurm", "jobs/gapfill.yaml", "--output", str(script),
                                "--nodes", "1", "--partition", slurm.partition,
                                "--time", "00:20:00", "--set", f"output.url={out}",
                                "--set", "train.epochs=5"])  # the script is tested, not the fit
    assert code == 0, err
    run_dir = tmp_path / "run"
    env = dict(slurm.env, CUBE_ENGINE_RUN_DIR=str(run_dir))
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60)
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 780
    record: dict[str, str] = {}
    while time.monotonic() < deadline:
        record = next((j for j in slurm.completed_jobs() if j["JobId"] == job), {})
        if record:
            break
        time.sleep(2)
    log = (tmp_path / f"job-{job}.out").read_text() if (tmp_path / f"job-{job}.out").exists() \
        else ""
    workers_log = run_dir / f"slurm-{job}" / "workers.log"
    assert record.get("JobState") == "COMPLETED", (record, log[-3000:],
                                                   workers_log.read_text()[-2000:]
                                                   if workers_log.exists() else "")
    assert record["ExitCode"] == "0:0" and record["Name"] == "cube-engine"
    assert "cluster: 1 workers" in log and "(TLS)" in log, log[-3000:]
    assert f"output: {out}" in log.replace("\n", "")  # rich may wrap the line
    assert not (run_dir / f"slurm-{job}" / "tls").exists()  # the job's key went with it
    code, stdout, _ = run_cli(["verify", out])
    assert code == 0 and "regions intact" in stdout
