"""sigscale.slurm: run any stage on a cluster through submitit (``sigscale submit | status | cancel``).

``executor`` (resources, Slurm/local executors, the sbatch script), ``train_job`` (distributed training
that checkpoints and requeues itself on preemption), ``arrays`` (capped job arrays that skip finished
tasks), ``submit`` (train / curate / eval submissions), ``jobs`` (records, waiting, status, cancel) and
``local_cluster.sh`` (a single-node Slurm for tests and the demo).
"""
