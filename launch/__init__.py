"""The launcher: Hydra configs, SLURM and local submission, the pipeline DAG, status and results."""
