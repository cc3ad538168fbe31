"""Programs a cluster node runs: the generic checkpointable job runner (`python -m jobs.run`)."""
