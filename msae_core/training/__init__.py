"""The training layer: the trainer and `msae train` (`trainer`). What it reads and writes (configs,
the run folder, checkpoints) is the runs layer's (msae_core.runs) below it."""
