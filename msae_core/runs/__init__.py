"""The run folder and everything that makes or reads one, below the trainer and the evals: run
configs and their checking (`config`), the folder's files (`folder`: status, metrics, events,
traces, the pair table, listing runs), checkpoints (`checkpoint`), starting and cancelling processes
through the one run queue (`jobs`), `msae sweep` (`sweep`), the Launch page's check (`launch`) and
SAELens SAEs in and out of a run folder (`saelens`: `msae import`, `msae export`). Imports only the
data layer and the SAE math below it."""
