"""A real single-node SLURM on this machine, for the ``slurm`` test tier.

The session fixture ``slurm`` installs Debian's ``slurm-wlm`` and ``munge`` with apt-get
when they are missing (the tier is skipped, with the reason, when that fails or when
this process is not root), writes a munge key and a ``slurm.conf`` for one node on
127.0.0.1 into a temporary folder, starts ``munged``, ``slurmctld`` and ``slurmd`` in
the foreground as child processes of the test session, waits until ``sinfo`` shows the
node idle, and afterwards stops those three processes (by their process ids) and
removes the folder. Nothing outside that folder is written or removed; the daemons use
their own ports, socket and spool directories, so a site's SLURM is left alone.

Without slurmdbd there is no ``sacct`` database (accounting_storage/none), so finished
jobs are read from the job completion log (``JobCompType=jobcomp/filetxt``):
:meth:`SlurmSite.completed_jobs`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
PARTITION = "engine-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> str | None:
    """Install slurm-wlm and munge if a command is missing; the reason when impossible."""
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and this is not root (apt-get needs root)"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).split()[-30:])
            return f"{' '.join(cmd)} failed ({tail})"
    missing = [c for c in COMMANDS if not shutil.which(c)]
    return f"installed {PACKAGES} but {missing} are still missing" if missing else None


def _node_line() -> str:
    """This machine as slurmd sees it (``slurmd -C``): real CPUs, sockets and memory."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True)
    words = [w for w in out.stdout.split() if "=" in w and not w.startswith("UpTime")]
    return " ".join(words)


@dataclass
class SlurmSite:
    """The running daemons and their files (everything under ``root``)."""

    root: str
    conf: str
    hostname: str
    cpus: int
    memory_mb: int
    jobcomp: str
    partition: str = PARTITION
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM commands (and the engine's SLURMCluster) of this site."""
        return dict(os.environ, SLURM_CONF=self.conf)

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env,
                              timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def completed_jobs(self) -> list[dict[str, str]]:
        """One dict per finished job from the completion log (JobId, Name, JobState...)."""
        if not os.path.exists(self.jobcomp):
            return []
        jobs = []
        with open(self.jobcomp) as f:
            for line in f:
                rec = dict(w.split("=", 1) for w in line.split() if "=" in w)
                if rec:
                    jobs.append(rec)
        return jobs

    def queue(self) -> list[dict[str, str]]:
        """Jobs SLURM knows now: id, name, state."""
        out = self.run("squeue", "--noheader", "--format=%i|%j|%T")
        return [dict(zip(("JobId", "Name", "JobState"), line.split("|"), strict=True))
                for line in out.splitlines() if line.strip()]

    def log(self, daemon: str) -> str:
        path = os.path.join(self.root, "log", f"{daemon}.log")
        return open(path).read() if os.path.exists(path) else ""


def _write_conf(root: str) -> SlurmSite:
    host = socket.gethostname()
    node = _node_line()
    fields = dict(w.split("=", 1) for w in node.split())
    cpus, memory = int(fields["CPUs"]), int(fields["RealMemory"])
    for sub in ("state", "spool", "log", "munge"):
        os.makedirs(os.path.join(root, sub), mode=0o700)
    jobcomp = os.path.join(root, "log", "jobcomp.txt")
    socket_path = os.path.join(root, "munge", "munge.socket")
    conf = os.path.join(root, "slurm.conf")
    text = f"""\
# generated by tests/conftest_slurm.py for the slurm test tier; removed afterwards
ClusterName=engine-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/spool/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={jobcomp}
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdTimeout=60
Waittime=0
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={PARTITION} Nodes={fields["NodeName"]} Default=YES MaxTime=INFINITE State=UP
"""
    with open(conf, "w") as f:
        f.write(text)
    key = os.path.join(root, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    return SlurmSite(root=root, conf=conf, hostname=host, cpus=cpus, memory_mb=memory,
                     jobcomp=jobcomp)


def _start(site: SlurmSite) -> None:
    munge = os.path.join(site.root, "munge")
    log = os.path.join(site.root, "log")
    cmds = {
        "munged": ["munged", "--foreground", "--force",
                   f"--socket={munge}/munge.socket", f"--key-file={munge}/munge.key",
                   f"--pid-file={munge}/munged.pid", f"--log-file={log}/munged.log",
                   f"--seed-file={munge}/munged.seed"],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", site.conf],
        "slurmd": ["slurmd", "-D", "-f", site.conf],
    }
    for name in DAEMONS:
        out = open(os.path.join(log, f"{name}.stdout"), "w")
        site.procs[name] = subprocess.Popen(
            cmds[name], stdout=out, stderr=subprocess.STDOUT, env=site.env,
            start_new_session=True)  # Ctrl-C of the test run reaches teardown, not them
        out.close()
        if name == "munged":
            _wait(lambda: os.path.exists(f"{munge}/munge.socket"), 20, "munged", site)


def _wait(ready, timeout: float, what: str, site: SlurmSite) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in site.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): "
                                   f"{site.log(name)[-2000:]}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout:g}s: "
                       + " | ".join(site.log(d)[-1500:] for d in DAEMONS))


def _node_idle(site: SlurmSite) -> bool:
    done = subprocess.run(["sinfo", "--noheader", "--format=%t", "-p", site.partition],
                          capture_output=True, text=True, env=site.env, timeout=30)
    return done.returncode == 0 and done.stdout.strip() == "idle"


def stop(site: SlurmSite) -> None:
    """Cancel the site's jobs, stop its three daemons (by pid) and remove its folder."""
    if "slurmctld" in site.procs and site.procs["slurmctld"].poll() is None:
        subprocess.run(["scancel", "--full", "--partition", site.partition],
                       env=site.env, capture_output=True, timeout=30)
    for name in reversed(DAEMONS):
        proc = site.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    shutil.rmtree(site.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmSite]:
    """A running single-node SLURM (partition ``engine-test``); see the module docstring."""
    reason = _install()
    if reason:
        pytest.skip(f"slurm tier: {reason}")
    root = tempfile.mkdtemp(prefix="cube-engine-slurm-")
    os.chmod(root, 0o700)
    site = _write_conf(root)
    try:
        _start(site)
        _wait(lambda: _node_idle(site), 60, "the SLURM node (sinfo: idle)", site)
        yield site
    finally:
        stop(site)
