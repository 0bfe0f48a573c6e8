"""Start cube-engine workers on SLURM with dask-jobqueue (pip install 'cube-engine[hpc]').

Scheduler, workers and clients speak TLS and authenticate each other with certificates
of one authority (deploy/make-certs.sh). The files must sit on a filesystem the compute
nodes see (the worker jobs read them), readable by you only:

    deploy/make-certs.sh $HOME/.dask-tls
    python deploy/slurm/cluster.py --jobs 8 --tls-ca $HOME/.dask-tls/ca.pem \\
        --tls-cert $HOME/.dask-tls/cluster.pem --tls-key $HOME/.dask-tls/cluster-key.pem
    cube-engine run jobs/gapfill.yaml --cluster scheduler-file:$SCRATCH/scheduler.json \\
        --tls-ca $HOME/.dask-tls/ca.pem --tls-cert $HOME/.dask-tls/client.pem \\
        --tls-key $HOME/.dask-tls/client-key.pem
"""

import argparse
import json
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--cores", type=int, default=8)
    p.add_argument("--memory", default="32GB")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--queue", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--gpus", action="store_true", help="one dask-cuda worker per GPU node")
    p.add_argument("--scheduler-file",
                   default=os.path.join(os.environ.get("SCRATCH", "."), "scheduler.json"))
    tls = p.add_argument_group("TLS (required: the cluster runs code for whoever reaches it)")
    tls.add_argument("--tls-ca", required=True, metavar="FILE", help="CA certificate (PEM)")
    tls.add_argument("--tls-cert", required=True, metavar="FILE",
                     help="certificate of the scheduler and workers (PEM)")
    tls.add_argument("--tls-key", required=True, metavar="FILE", help="its private key (PEM)")
    return p.parse_args(argv)


def cluster_kwargs(args):
    """Keyword arguments of SLURMCluster: TLS for scheduler and workers, GPU options."""
    from distributed import Security

    files = [os.path.abspath(f) for f in (args.tls_ca, args.tls_cert, args.tls_key)]
    for f in files:
        if not os.path.isfile(f):
            raise SystemExit(f"cluster.py: {f}: no such file (make them with deploy/make-certs.sh)")
    ca, cert, key = files
    # jobqueue turns the worker role into --tls-ca-file/--tls-cert/--tls-key of each worker
    security = Security(require_encryption=True, tls_ca_file=ca,
                        tls_scheduler_cert=cert, tls_scheduler_key=key,
                        tls_worker_cert=cert, tls_worker_key=key,
                        tls_client_cert=cert, tls_client_key=key)
    kwargs = dict(cores=args.cores, memory=args.memory, walltime=args.walltime,
                  queue=args.queue, account=args.account,
                  protocol="tls://", security=security)
    if args.gpus:
        kwargs.update(
            job_extra_directives=["--gpus=1"],
            worker_command="dask_cuda.cli worker",
            worker_extra_args=["--resources", "GPU=1"],
            processes=1,
        )
    return kwargs


def main(argv=None):
    from dask_jobqueue import SLURMCluster

    args = parse_args(argv)
    cluster = SLURMCluster(**cluster_kwargs(args))
    cluster.scale(jobs=args.jobs)
    fd = os.open(args.scheduler_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": cluster.scheduler_address, "type": "Scheduler"}, f)
    print(cluster.job_script())
    print(f"scheduler: {cluster.scheduler_address} (written to {args.scheduler_file}); "
          "Ctrl-C stops")
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
