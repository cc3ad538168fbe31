"""Where planned jobs run: SLURM through submitit (with the batch script's safety checks), or this machine."""
