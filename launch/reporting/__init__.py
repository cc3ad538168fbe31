"""What the user reads back: job states, status, progress, logs, the description of a config, results."""
