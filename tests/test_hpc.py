"""SLURM without SLURM: settings -> dask-jobqueue job scripts, sbatch scripts, bad input.

``SLURMCluster(...)`` starts only its scheduler (in this process, on 127.0.0.1) until it
is scaled, so the job scripts below are dask-jobqueue's own, from the pinned release.
Real worker jobs run in the ``slurm`` tier (tests/test_slurm.py).

Golden files: tests/golden/slurm/*.sbatch. After an intended change of the output,
rewrite them with ``ENGINE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_hpc.py``
and review the diff.
"""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys

import dask
import pytest

from engine.errors import SpecError
from engine.hpc import slurm_cluster_kwargs, slurm_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "slurm"
UPDATE = os.environ.get("ENGINE_UPDATE_GOLDEN") == "1"


def _config(**slurm):
    """engine.cluster.slurm set completely (a user's own dask config cannot leak in)."""
    base = {"queue": None, "account": None, "walltime": "01:00:00", "cores": 8,
            "memory": "32GiB", "processes": 1, "gpus": 0, "job-extra-directives": [],
            "job-script-prologue": [], "scale": 2, "log-directory": None, "interface": None,
            "host": None, "python": None, "tls": False, "shared-directory": None,
            "worker-timeout": "10m"}
    base.update({k.replace("_", "-"): v for k, v in slurm.items()})
    return dask.config.set({"engine.cluster.slurm": base,
                            "engine.cluster.gpu-threads-per-worker": 6})


def _job_script(**kwargs):
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(**kwargs)
    try:
        return cluster.job_script(), cluster.scheduler_address
    finally:
        cluster.close()


def test_cpu_job_script_carries_every_setting(tmp_path):
    with _config(queue="debug", account="climate", walltime="00:30:00", cores=4, processes=2,
                 memory="8GiB", job_extra_directives=["--qos=short"], interface="lo",
                 job_script_prologue=["module load netcdf"], log_directory=str(tmp_path)):
        script, address = _job_script(**slurm_cluster_kwargs(slurm_settings()))
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for line in ("#SBATCH -p debug", "#SBATCH -A climate", "#SBATCH -t 00:30:00",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G", "#SBATCH --qos=short",
                 f"#SBATCH -o {tmp_path}/cube-engine-worker-%J.out"):
        assert line in header, (line, header)
    assert "gres" not in script and "GPU=1" not in script
    command = script.splitlines()[-1]
    assert command.startswith(f"{sys.executable} -m distributed.cli.dask_worker {address} ")
    assert "--nworkers 2 " in command and "--nthreads 2 " in command  # 4 cores / 2 processes
    assert "--memory-limit 4.00GiB" in command  # 8 GiB / 2 processes
    assert "--interface lo" in command and address.startswith("tcp://127.0.0.1:")
    assert script.index("module load netcdf") < script.index(command)


def test_gpu_job_script_asks_for_gres_and_starts_dask_cuda_workers_with_gpu_resource():
    with _config(queue="gpu", account="climate", walltime="1-00:00:00", cores=16,
                 memory="64GiB", gpus=2, interface="lo"):
        script, _ = _job_script(**slurm_cluster_kwargs(slurm_settings(), gpu_threads_per_worker=6))
    assert "#SBATCH --gres=gpu:2" in script and "#SBATCH -p gpu" in script
    assert "#SBATCH --cpus-per-task=16" in script  # what SLURM books, not the thread count
    assert "#SBATCH -t 1-00:00:00" in script and "#SBATCH -A climate" in script
    command = script.splitlines()[-1]
    assert " -m dask_cuda.cli worker " in command
    assert "--resources GPU=1" in command
    assert "--nthreads 6 " in command  # engine.cluster.gpu-threads-per-worker
    assert "--memory-limit 32.00GiB" in command  # 64 GiB / 2 GPU workers
    assert "--nworkers" not in command  # dask-cuda starts one worker per visible GPU


def test_gpu_threads_come_from_engine_config_in_connect_kwargs():
    with _config(gpus=1, cores=8, memory="16GiB"):
        kw = slurm_cluster_kwargs(slurm_settings(), gpu_threads_per_worker=
                                  dask.config.get("engine.cluster.gpu-threads-per-worker"))
    assert (kw["cores"], kw["processes"], kw["job_cpu"]) == (6, 1, 8)


def test_tls_by_default_with_private_worker_certificates(tmp_path):
    from engine.security import temporary_security

    shared = tmp_path / "shared"
    with _config(tls=True, shared_directory=str(shared), interface="lo"):
        kw = slurm_cluster_kwargs(slurm_settings(), security=temporary_security())
        script, address = _job_script(**kw)
        assert address.startswith("tls://127.0.0.1:")
        command = script.splitlines()[-1]
        assert "--protocol tls://" in command
        files = [command.split(flag + " ")[1].split()[0]
                 for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")]
        for f in files:  # written while the cluster lives, for the worker jobs to read
            assert os.path.dirname(f) == str(shared)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o700


def test_the_dashboard_stays_on_loopback():
    with _config(interface="lo"):
        kw = slurm_cluster_kwargs(slurm_settings(), dashboard_address=":8787")
    assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"
    assert kw["worker_extra_args"][-2:] == ["--dashboard-address", "127.0.0.1:0"]


@pytest.mark.parametrize(("key", "value", "says"), [
    ("cores", -2, "cores must be a whole number of at least 1, got -2"),
    ("cores", "eight", "cores must be a whole number"),
    ("processes", 0, "processes must be a whole number of at least 1"),
    ("gpus", -1, "gpus must be a whole number of at least 0"),
    ("scale", 0, "scale must be a whole number of at least 1"),
    ("walltime", "1h", "walltime must be a time limit HH:MM:SS or D-HH:MM:SS, got '1h'"),
    ("walltime", "01:75:00", "walltime must be a time limit"),
    ("walltime", "00:00:00", "walltime must be a time limit"),
    ("memory", "lots", "memory must be a size per job, got 'lots'"),
    ("memory", "64MiB", "memory '64MiB' is 64.00 MiB per worker, too little"),
    ("queue", "a\nb", "queue must be one line of text"),
    ("job-extra-directives", ["--qos=x\nrm -rf /"], "job-extra-directives must be a list"),
    ("tls", "maybe", "tls must be true or false"),
    ("worker-timeout", "soon", "worker-timeout must be a duration"),
])
def test_bad_setting_is_one_line_naming_the_key(key, value, says):
    with _config(**{key: value}), pytest.raises(SpecError) as err:
        slurm_settings()
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"engine.cluster.slurm.{key} "), text
    assert says in text, text
    assert "DASK_ENGINE__CLUSTER__SLURM__" in text or "too little" in text


def test_more_processes_than_cores_and_a_misspelt_key_are_refused():
    with _config(cores=2, processes=4), pytest.raises(SpecError, match="processes .4. is more"):
        slurm_settings()
    with pytest.raises(SpecError, match="slurm.walltme is not a setting: did you mean walltime"):
        slurm_settings(walltme="01:00:00")


def test_environment_variables_reach_the_settings():
    env = dict(os.environ, DASK_ENGINE__CLUSTER__SLURM__LOG_DIRECTORY="/scratch/logs",
               DASK_ENGINE__CLUSTER__SLURM__CORES="3")
    code = ("from engine.hpc import slurm_settings; s = slurm_settings(); "
            "print(s.log_directory, s.cores)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["/scratch/logs", "3"]


def test_connect_slurm_checks_before_submitting(monkeypatch):
    """Bad settings or local-only sizes fail before dask-jobqueue is even asked."""
    from engine.cluster import connect

    def no_cluster(*a, **k):
        raise AssertionError("SLURMCluster started for bad input")

    import dask_jobqueue

    monkeypatch.setattr(dask_jobqueue, "SLURMCluster", no_cluster)
    with _config(walltime="forever"), pytest.raises(SpecError, match="slurm.walltime"):
        connect("slurm")
    with _config(), pytest.raises(SpecError, match="n_workers sizes local clusters only"):
        connect("slurm", n_workers=2)


def test_run_with_bad_slurm_setting_exits_2_with_one_line(run_cli):
    with _config(cores=0):
        code, out, err = run_cli(["run", "jobs/gapfill.yaml", "--cluster", "slurm",
                                  "--output", "/nonexistent/never-written.zarr"])
    assert code == 2
    assert err.strip().splitlines() == [
        "cube-engine: error: engine.cluster.slurm.cores must be a whole number of at least 1, "
        "got 0: e.g. DASK_ENGINE__CLUSTER__SLURM__CORES=8"]


# --- cube-engine deploy slurm -----------------------------------------------------------

CASES = {
    "cpu": ["--nodes", "4", "--partition", "compute", "--account", "climate",
            "--time", "04:00:00", "--set", "output.url=/scratch/climate/gap filled.zarr"],
    "gpu": ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time",
            "1-00:00:00"],
}


def _deploy(run_cli, args):
    with _config(cores=16, memory="64GiB", processes=2,
                 job_script_prologue=["source /opt/cube-engine/bin/activate"],
                 job_extra_directives=["--qos=normal"]):
        return run_cli(["deploy", "slurm", "jobs/gapfill.yaml", *args])


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatch_golden(case, run_cli):
    code, text, err = _deploy(run_cli, CASES[case])
    assert code == 0, err
    golden = GOLDEN / f"{case}.sbatch"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: ENGINE_UPDATE_GOLDEN=1 writes it"
    assert text == golden.read_text(), (
        f"output differs from {golden}; if intended, regenerate with ENGINE_UPDATE_GOLDEN=1")
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_sbatch_script_runs_the_job_in_one_allocation(run_cli):
    _, cpu, _ = _deploy(run_cli, CASES["cpu"])
    _, gpu, _ = _deploy(run_cli, CASES["gpu"])
    lines = cpu.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=16",
                      "--mem=65536M", "--time=04:00:00", "--partition=compute",
                      "--account=climate", "--qos=normal"):
        assert f"#SBATCH {directive}" in lines, directive
    # scheduler first (writes the file), workers by srun, then the job on that file
    sched = cpu.index("dask_scheduler --protocol tls")
    workers = cpu.index("srun --ntasks-per-node=1")
    run = cpu.index("cube-engine run jobs/gapfill.yaml --cluster \"scheduler-file:")
    assert cpu.index("source /opt/cube-engine/bin/activate") < sched < workers < run
    assert "dask_worker --nworkers 2 --nthreads 8" in cpu and "--memory-limit 24.00GiB" in cpu
    assert cpu.count('"${TLS[@]}"') == 2 and "--tls-ca \"$RUN_DIR/tls/ca.pem\"" in cpu
    assert "gres" not in cpu and "dask_cuda" not in cpu
    assert cpu.rstrip().endswith("--set 'output.url=/scratch/climate/gap filled.zarr'")
    assert "#SBATCH --gres=gpu:4" in gpu.splitlines()
    assert "dask_cuda.cli worker --nthreads 6" in gpu and "--resources GPU=1" in gpu


def test_deploy_slurm_writes_the_file_and_replaces_only_its_own(run_cli, tmp_path):
    out = tmp_path / "run.sbatch"
    code, stdout, err = _deploy(run_cli, ["--output", str(out)])
    assert code == 0 and stdout == "" and "sbatch " + str(out) in err
    assert out.read_text().startswith("#!/bin/bash\n# Written by `cube-engine deploy slurm")
    assert os.access(out, os.X_OK)
    assert _deploy(run_cli, ["--output", str(out), "--nodes", "3"])[0] == 0
    assert "#SBATCH --nodes=3" in out.read_text()
    mine = tmp_path / "mine.sbatch"
    mine.write_text("#!/bin/bash\n#SBATCH --nodes=1\nhostname\n")
    code, _, err = _deploy(run_cli, ["--output", str(mine)])
    assert code == 2 and "was not written by cube-engine deploy slurm" in err
    assert mine.read_text() == "#!/bin/bash\n#SBATCH --nodes=1\nhostname\n"


@pytest.mark.parametrize(("args", "says"), [
    (["--nodes", "0"], "--nodes must be a whole number of at least 1, got '0'"),
    (["--nodes", "two"], "--nodes must be a whole number"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be a whole number of at least 0"),
    (["--time", "4h"], "--time must be HH:MM:SS or D-HH:MM:SS, got '4h'"),
    (["--partition", "a b"], "--partition must be one word"),
])
def test_deploy_slurm_bad_flag_is_one_line_and_writes_nothing(run_cli, tmp_path, args, says):
    out = tmp_path / "run.sbatch"
    code, stdout, err = _deploy(run_cli, [*args, "--output", str(out)])
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_deploy_slurm_validates_the_job_file_first(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "jobs" / "gapfill.yaml").read_text().replace(
        "epochs: 60", "epochs: sixty"))
    out = tmp_path / "run.sbatch"
    code, stdout, err = run_cli(["deploy", "slurm", str(bad), "--output", str(out)])
    assert code == 2 and stdout == "" and "train.epochs" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = run_cli(["deploy", "slurm", str(tmp_path / "missing.yaml")])
    assert code == 2 and "job file not found" in err
