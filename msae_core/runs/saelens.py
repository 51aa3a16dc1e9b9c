"""`msae import`: a SAELens SAE (a local folder, or a published one through sae-lens) as a run
folder that every eval and page accepts; and `msae export RUN --format saelens`, the other way.

The run folder holds the SAE in our format (sae_io.import_saelens: input scale 1, the weights as
SAELens has them), a config whose data section names the SAE's model and layer (read from its
cfg.json, or given), and a status `done` at step 0 with `imported_from`. With `--acts STORE` the
run reads that activation store (the feature pages' token examples come from it); without, it is a
"stream" run of the model and layer, which is all the evals need.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from msae_core.errors import MsaeError

log = logging.getLogger(__name__)


def _meta(cfg: dict, key: str) -> Any:
    """A field of SAELens's cfg.json: its `metadata` object (SAELens 6), else the flat field (5.x)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return meta.get(key, cfg.get(key))


def model_and_layer(cfg: dict, model: str = "", layer: int | None = None) -> tuple[str, int, int]:
    """(model, layer, context size) of a SAELens cfg, `model` / `layer` overriding it; MsaeError
    for a hook other than a block's residual output (blocks.L.hook_resid_post)."""
    hook = str(_meta(cfg, "hook_name") or "")
    if layer is None:
        parts = hook.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] != "hook_resid_post":
            raise MsaeError(f"the SAE reads hook {hook or '(none given)'!r}: msae splices only a block's "
                            "residual output (blocks.L.hook_resid_post); give --layer to say which block")
        layer = int(parts[1])
    model = model or str(_meta(cfg, "model_name") or "")
    if not model:
        raise MsaeError("the SAE's cfg.json names no model (metadata.model_name): give --model")
    ctx = _meta(cfg, "context_size")
    return model, layer, int(ctx) if isinstance(ctx, int) and ctx >= 2 else 128


def check_model_fits(model: str, layer: int, d_in: int) -> str:
    """'' when `model` has a block `layer` whose output is `d_in` wide; MsaeError when it cannot
    work. A hub name whose config cannot be read here (offline, gated, a mirror without it) gets a
    note instead: the model may well exist where the evals will run."""
    from msae_core.data.lm import EMBEDDED, model_shape

    try:
        width, n_layers = model_shape(model)
    except MsaeError as exc:
        if model == EMBEDDED or Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
            raise
        return f"{model}'s layer count and width were not checked: {exc}"
    if n_layers is not None and layer >= n_layers:
        raise MsaeError(f"layer {layer} is past the last block of {model} ({n_layers} blocks: 0..{n_layers - 1})")
    if width != d_in:
        raise MsaeError(f"the SAE reads activations of width {d_in}, {model}'s blocks output {width}: "
                        "give the model it was trained on (--model)")
    return ""


def import_run(folder: str | Path, out: str | Path, *, model: str = "", layer: int | None = None,
               acts: str = "", corpus: str = "embedded", source: str = "") -> Path:
    """Write the run folder `out` for the SAELens SAE in `folder`, recording `source` (default:
    the folder's path) as where it came from. Refuses an `out` that exists and is not empty, and
    a model, layer, width or corpus that the evals could not use (a model that cannot be reached
    here is imported unchecked, said in the log)."""
    from msae_core.data.text import load_corpus
    from msae_core.artifacts import RUN_CONFIG, check_can_create
    from msae_core.data.store import ActivationStore
    from msae_core.sae_io import import_saelens, save_sae
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.runs.folder import write_status

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MsaeError(f"{out} exists and is not empty: choose a new folder for the imported run")
    check_can_create(out)
    sae, cfg = import_saelens(folder)
    model, layer, ctx = model_and_layer(cfg, model, layer)
    if layer < 0:
        raise MsaeError(f"layer must be >= 0 (got {layer})")
    note = check_model_fits(model, layer, sae.cfg.d_in)
    if note:
        log.warning("%s", note)
    if not acts:
        load_corpus(corpus)  # MsaeError in one line for a corpus that cannot be read
    if acts:
        store = ActivationStore(acts)
        if store.d_in != sae.cfg.d_in:
            raise MsaeError(f"the store {acts} holds activations of width {store.d_in}, the SAE reads {sae.cfg.d_in}")
        data = DataConfig(acts=str(acts))
    else:
        data = DataConfig(source="stream", model=model, layer=layer, corpus=corpus, context_size=ctx)
    out.mkdir(parents=True, exist_ok=True)
    source = source or str(Path(folder).resolve())
    save_sae(sae, out, extra={"imported_from": source, "saelens_cfg": cfg})
    RunConfig(sae=sae.cfg, train=TrainConfig(steps=1), data=data).save(out / RUN_CONFIG)
    write_status(out, state="done", step=0, total_steps=0, imported_from=source,
                 error=None, pid=None)
    return out


EXPORT_FORMATS = ("saelens",)


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "saelens") -> Path:
    """Write the finished run's SAE into `out` in SAELens's on-disk format (sae_io.export_saelens:
    cfg.json with its model, hook, context size and corpus, and sae_weights.safetensors), which
    `msae import` and SAELens read back to the same SAE. Refuses a run without final weights and
    an `out` that exists and is not empty."""
    from msae_core.artifacts import RUN_CONFIG, SAE_CONFIG, SAE_WEIGHTS, check_can_create
    from msae_core.data.store import read_manifest
    from msae_core.sae_io import export_saelens, load_sae
    from msae_core.runs.config import RunConfig
    from msae_core.runs.folder import read_status

    if fmt not in EXPORT_FORMATS:
        raise MsaeError(f"unknown export format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / RUN_CONFIG).is_file():
        raise MsaeError(f"{run_dir} is not a run folder ({RUN_CONFIG} missing)")
    state = read_status(run_dir).get("state")
    if state != "done" or not (run_dir / SAE_WEIGHTS).is_file() or not (run_dir / SAE_CONFIG).is_file():
        raise MsaeError(f"run {run_dir.name} has no final weights to export (it is {state or 'unknown'})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MsaeError(f"{out} exists and is not empty: choose a new folder for the export")
    check_can_create(out)
    data = RunConfig.load(run_dir / RUN_CONFIG).data
    manifest = (read_manifest(data.store_path) if data.store_path else None) or {}
    model = str(manifest.get("model") or data.model)
    layer = int(manifest["layer"]) if "layer" in manifest else data.layer
    corpus = manifest.get("corpus", data.corpus)
    corpus = str(corpus.get("name", "")) if isinstance(corpus, dict) else str(corpus)
    return export_saelens(load_sae(run_dir), out, model_name=model, hook_name=f"blocks.{layer}.hook_resid_post",
                          context_size=int(manifest.get("context_size") or data.context_size),
                          dataset_path=corpus)


def _export(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, args.format)
    print(f"exported {Path(args.run).name} into {out} (SAELens's format: cfg.json, sae_weights.safetensors)")
    return 0


def _fetch_published(release: str, sae_id: str, into: Path) -> Path:
    """A published SAE saved in SAELens's on-disk format into `into`, through sae-lens and the hub."""
    try:
        from sae_lens import SAE  # type: ignore
    except ImportError:
        raise MsaeError("--release needs the sae-lens package (pip install 'msae[bench]') and the Hugging "
                        "Face hub; without them, download the SAE folder and import it by path") from None
    try:
        loaded = SAE.from_pretrained(release, sae_id, device="cpu")
        sae = loaded[0] if isinstance(loaded, tuple) else loaded
        sae.save_model(str(into))
    except Exception as exc:  # noqa: BLE001 - the hub's and sae-lens's own errors, in one line
        raise MsaeError(f"cannot fetch {release} / {sae_id}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    return into


def _run(args: argparse.Namespace) -> int:
    if bool(args.path) == bool(args.release):
        raise MsaeError("give either a SAELens folder (PATH) or --release with --sae-id")
    if args.release and not args.sae_id:
        raise MsaeError("--release needs --sae-id")
    with tempfile.TemporaryDirectory(prefix="msae-import-") as tmp:
        folder = Path(args.path) if args.path else _fetch_published(args.release, args.sae_id, Path(tmp))
        out = import_run(folder, args.out, model=args.model, layer=args.layer, acts=args.acts, corpus=args.corpus,
                         source=f"{args.release} / {args.sae_id}" if args.release else "")
    print(f"imported into {out}: evaluate it with `msae eval {out}`")
    from msae_core.artifacts import RUN_CONFIG
    from msae_core.data.lm import EMBEDDED_SOURCE
    from msae_core.runs.config import RunConfig

    if not args.model and RunConfig.load(out / RUN_CONFIG).data.model == EMBEDDED_SOURCE:
        print(f"its model {EMBEDDED_SOURCE} is the one msae embeds a 4-bit copy of: without the hub, "
              "import again with --model embedded (the quantised weights give slightly different activations)")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="a SAELens SAE (folder or published) as a run folder",
        description="Read a SAE in SAELens's on-disk format (cfg.json + sae_weights.safetensors; "
                    "standard, topk and jumprelu, which is how SAELens saves BatchTopK and Matryoshka) "
                    "into a run folder that `msae eval` and the workbench accept.")
    p.add_argument("path", nargs="?", default="", help="a SAELens SAE folder")
    p.add_argument("--out", required=True, help="the new run folder")
    p.add_argument("--release", default="", help="a published SAE release (needs sae-lens and the hub)")
    p.add_argument("--sae-id", default="", help="the SAE's id in that release")
    p.add_argument("--model", default="", help="the language model (default: the SAE's cfg.json model_name; "
                   "'embedded' for Gemma 3 270M offline)")
    p.add_argument("--layer", type=int, default=None, help="the block whose output it reads (default: from its hook)")
    p.add_argument("--acts", default="", help="an activation store of that model and layer, for token examples")
    p.add_argument("--corpus", default="embedded", help="text the evals run on (default: %(default)s)")
    p.set_defaults(func=_run)
    e = subparsers.add_parser(
        "export", help="a run's SAE in SAELens's format (read back by msae import and SAELens)",
        description="Write a finished run's SAE as SAELens saves one: cfg.json (model, hook, context size, "
                    "corpus) and sae_weights.safetensors, the input scale folded into the weights. A momentum "
                    "SAE is written as its base architecture; BatchTopK and Matryoshka as jumprelu with their "
                    "threshold, as SAELens saves them.")
    e.add_argument("run", metavar="RUN", help="a finished run folder")
    e.add_argument("--format", default="saelens", choices=EXPORT_FORMATS, help="(default: %(default)s)")
    e.add_argument("--out", required=True, help="the new folder for the export")
    e.set_defaults(func=_export)
