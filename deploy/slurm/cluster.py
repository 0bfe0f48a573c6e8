"""Start cube-engine workers on SLURM with dask-jobqueue (pip install 'cube-engine[hpc]').

    python deploy/slurm/cluster.py --jobs 8 --gpus      # prints the scheduler address
    cube-engine run jobs/gapfill.yaml --cluster scheduler-file:$SCRATCH/scheduler.json
"""

import argparse
import json
import os
import time

from dask_jobqueue import SLURMCluster

p = argparse.ArgumentParser()
p.add_argument("--jobs", type=int, default=4)
p.add_argument("--cores", type=int, default=8)
p.add_argument("--memory", default="32GB")
p.add_argument("--walltime", default="04:00:00")
p.add_argument("--queue", default=None)
p.add_argument("--account", default=None)
p.add_argument("--gpus", action="store_true", help="one dask-cuda worker per GPU node")
p.add_argument("--scheduler-file", default=os.path.join(os.environ.get("SCRATCH", "."), "scheduler.json"))
args = p.parse_args()

extra = {}
if args.gpus:
    extra = dict(
        job_extra_directives=["--gpus=1"],
        worker_command="dask_cuda.cli worker",
        worker_extra_args=["--resources", "GPU=1"],
        processes=1,
    )
cluster = SLURMCluster(cores=args.cores, memory=args.memory, walltime=args.walltime,
                       queue=args.queue, account=args.account, **extra)
cluster.scale(jobs=args.jobs)
with open(args.scheduler_file, "w") as f:
    json.dump({"address": cluster.scheduler_address, "type": "Scheduler"}, f)
print(cluster.job_script())
print(f"scheduler: {cluster.scheduler_address} (written to {args.scheduler_file}); Ctrl-C stops")
try:
    while True:
        time.sleep(60)
except KeyboardInterrupt:
    cluster.close()
