"""Training proper: config, optimiser/EMA, the step and loop, checkpoints. No orchestration here."""
