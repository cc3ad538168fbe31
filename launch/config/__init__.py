"""From what the user typed to a typed launch config: Hydra composition, the schema, sweeps."""
