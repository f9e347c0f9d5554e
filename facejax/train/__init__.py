"""Training: the jitted sharded step, optax policies, orbax checkpoints, the epoch loop, export."""
