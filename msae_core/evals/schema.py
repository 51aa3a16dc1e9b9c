"""SAEBench's per-eval result layout, and the run's eval.json that holds one such result per eval.

SAEBench (sae_bench.evals.base_eval_output.BaseEvalOutput) writes, for each eval:
eval_type_id, eval_config, eval_id, datetime_epoch_millis, eval_result_metrics (metric groups ->
metric -> value), eval_result_details (a list of per-item dicts), sae_bench_commit_hash,
sae_lens_id, sae_lens_release_id, sae_lens_version, sae_cfg_dict, eval_result_unstructured.
We fill the same keys; the SAELens ids name our run (`msae/<run>`), and `sae_bench_commit_hash`
says which definitions were followed and whether the `sae-bench` package computed the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from msae_core import __version__
from msae_core.artifacts import RUN_EVAL, atomic_write_json
from msae_core.errors import MsaeError

SAEBENCH_KEYS = ("eval_type_id", "eval_config", "eval_id", "datetime_epoch_millis",
                 "eval_result_metrics", "eval_result_details", "sae_bench_commit_hash",
                 "sae_lens_id", "sae_lens_release_id", "sae_lens_version", "sae_cfg_dict",
                 "eval_result_unstructured")

# the SAEBench release whose metric definitions the evals follow
SAEBENCH_DEFINITIONS = "sae-bench 0.6.0 definitions, computed by msae"


def _jsonable(obj: Any) -> Any:
    """Tensors, numpy scalars and dataclasses -> plain json values; NaN/inf -> None."""
    import math

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def make_result(ctx: Any, eval_type_id: str, eval_config: Any, metrics: dict,
                details: list | None = None, unstructured: Any = None,
                computed_by: str = SAEBENCH_DEFINITIONS) -> dict:
    """One eval's result in SAEBench's layout. `ctx` is an EvalContext (or None in unit tests)."""
    run = getattr(ctx, "run_dir", None)
    return _jsonable({
        "eval_type_id": eval_type_id,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details or [],
        "sae_bench_commit_hash": computed_by,
        "sae_lens_id": f"msae/{Path(run).name}" if run else None,
        "sae_lens_release_id": "msae",
        "sae_lens_version": f"msae {__version__}",
        "sae_cfg_dict": ctx.sae_info() if ctx is not None and hasattr(ctx, "sae_info") else {},
        "eval_result_unstructured": unstructured,
    })


def check_result(result: dict) -> list[str]:
    """Problems of one eval result against SAEBench's layout ([] when it conforms)."""
    if not isinstance(result, dict):
        return [f"result is a {type(result).__name__}, not an object"]
    out = [f"missing key {k}" for k in SAEBENCH_KEYS if k not in result]
    if not isinstance(result.get("eval_result_metrics"), dict):
        out.append("eval_result_metrics is not an object of metric groups")
    else:
        for group, vals in result["eval_result_metrics"].items():
            if not isinstance(vals, dict):
                out.append(f"metric group {group} is not an object")
    if not isinstance(result.get("eval_result_details", []), list):
        out.append("eval_result_details is not a list")
    return out


def read_eval_json(run_dir: str | os.PathLike) -> dict:
    """The run's eval.json ({} when there is none). A corrupt file is an error, not silently lost."""
    path = Path(run_dir) / RUN_EVAL
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise MsaeError(f"{path} is unreadable ({exc}); move it away to evaluate again") from exc
    if not isinstance(data, dict):
        raise MsaeError(f"{path} is not an object of eval results; move it away to evaluate again")
    return data


FLAGS_KEY = "msae_flags"  # eval.json's list of suspicious values (evals.flags), beside the evals


def write_flags(run_dir: str | os.PathLike, flags: list[str]) -> dict:
    """Put the run's suspicious-value lines into eval.json (atomic replace). Returns the content."""
    data = read_eval_json(run_dir)
    data[FLAGS_KEY] = list(flags)
    atomic_write_json(Path(run_dir) / RUN_EVAL, data)
    return data


def write_eval_result(run_dir: str | os.PathLike, name: str, result: dict) -> dict:
    """Merge one eval's result into eval.json (atomic replace). Returns the new content."""
    problems = check_result(result)
    if problems:
        raise ValueError(f"{name} result does not follow SAEBench's layout: {'; '.join(problems)}")
    data = read_eval_json(run_dir)
    data[name] = result
    atomic_write_json(Path(run_dir) / RUN_EVAL, data)
    return data
