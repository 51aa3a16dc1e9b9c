"""The training layer: run configs (`config`), run folders (`run_folder`: status, listing, the
trainer's files), checkpoints (`checkpoint`), the trainer and `msae train` (`trainer`), starting and
cancelling processes through the one run queue (`jobs`) and `msae sweep` (`sweep`). Imports only the
data layer and the SAE math below it."""
