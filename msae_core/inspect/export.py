"""Figure and table export: PNG/SVG/PDF through plotly + kaleido (headless Chromium), CSV, and a
write-up bundle (figures + a markdown table of runs and settings) under results/exports/.

kaleido 1.x drives a Chromium found by `choreographer`; we point it at Debian's chromium with
BROWSER_PATH (/usr/bin/chromium) unless the environment already names one."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from msae_core.artifacts import EXPORT_FIGURES_DIR, EXPORT_README, EXPORT_RUNS_CSV, EXPORT_RUNS_MD
from msae_core.errors import MsaeError
from msae_core.inspect import figures as F
from msae_core.paths import exports_root, results_root
from msae_core.inspect.run_files import events_by_pair, load_events, load_traces, top_pressure_features, trace_files
from msae_core.inspect.runs_table import runs_table

log = logging.getLogger(__name__)

FORMATS = ("png", "svg", "pdf")
MIME = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "csv": "text/csv"}
DEFAULT_BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

RUN_TABLE_COLUMNS = ["name", "state", "data", "arch", "base", "beta", "tau", "lam", "k", "l1_coeff", "d_sae",
                     "lr", "steps", "batch_size", "tokens", "explained_variance", "ce_loss_score",
                     "kl_div_score", "absorption", "absorption_ci_low", "absorption_ci_high", "l0",
                     "dead_fraction", "sae_probe_acc", "sae_top1_acc", "synth_explained_variance", "synth_absorption",
                     "synth_absorption_ci_low", "synth_absorption_ci_high", "synth_f1", "synth_mcc", "synth_l0"]
# the scores among them: a bundle of runs none of which has one says so (evaluate them first)
SCORE_COLUMNS = RUN_TABLE_COLUMNS[RUN_TABLE_COLUMNS.index("explained_variance"):]


# the figure exporter's loggers: each PNG logs ~25 INFO lines about its browser and temp files
EXPORTER_LOGGERS = ("kaleido", "choreographer", "logistro")


def configure_browser() -> str | None:
    """Set BROWSER_PATH for kaleido/choreographer to Debian's chromium when none is set, and keep
    the exporter's own INFO lines out of the log (warnings still show; `msae -v` shows them all)."""
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
            logger.setLevel(logging.WARNING)
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    for p in DEFAULT_BROWSERS:
        if os.access(p, os.X_OK):
            os.environ["BROWSER_PATH"] = p
            return p
    return None


def figure_bytes(fig: Any, fmt: str = "png", width: int = 1100, height: int | None = None,
                 scale: float = 2.0) -> bytes:
    """One figure as PNG, SVG or PDF bytes. MsaeError with the cause when rendering fails."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise MsaeError(f"unknown figure format {fmt!r}: use one of {', '.join(FORMATS)}")
    configure_browser()
    import plotly.io as pio

    h = height or int(fig.layout.height or 500)
    try:
        return pio.to_image(fig, format=fmt, width=width, height=h, scale=scale if fmt == "png" else 1)
    except Exception as exc:  # noqa: BLE001 - kaleido/chromium failures become a one-line cause
        raise MsaeError(f"cannot render the figure as {fmt} (kaleido + chromium at "
                        f"{os.environ.get('BROWSER_PATH')}): {exc}".splitlines()[0]) from exc


def table_csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def runs_markdown(df: pd.DataFrame, columns: list[str] | None = None) -> str:
    """A markdown table of runs and their settings and scores (columns with no value dropped)."""
    cols = [c for c in (columns or RUN_TABLE_COLUMNS) if c in df.columns and df[c].notna().any()]
    if df.empty or not cols:
        return "_no runs_\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def safe_file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")
    return stem[:80] or "figure"


def standard_figures(root: str | os.PathLike | None = None, runs: pd.DataFrame | None = None,
                     max_runs: int = 4) -> dict[str, Any]:
    """The write-up's figures built from disk: trade-off (EV and CE score; F1 against exact
    absorption when runs were scored on a synthetic store), and for up to
    `max_runs` momentum runs with traces, the pressure heatmap and competition events."""
    df = runs if runs is not None else runs_table(root)
    figs: dict[str, Any] = {
        "tradeoff-explained-variance": F.tradeoff_figure(df, y="explained_variance", color="arch"),
        "tradeoff-ce-loss-score": F.tradeoff_figure(df, y="ce_loss_score", color="arch"),
    }
    if not df.empty and df["synth_absorption"].notna().any():  # runs scored against a synthetic truth
        figs["tradeoff-synthetic-f1"] = F.tradeoff_figure(df, y="synth_f1", x="synth_absorption", color="arch")
    mom = df[(df["arch"] == "momentum") & (df["problem"].fillna("") == "")] if not df.empty else df
    for path in list(mom["path"])[:max_runs]:
        if not trace_files(path):
            continue
        name = Path(path).name
        feats = top_pressure_features(path, 40)
        if feats:  # no feature under pressure: no heatmap of zeros
            tr = load_traces(path, feats)
            figs[f"{name}-pressure-heatmap"] = F.heatmap_figure(tr.steps, tr.features.tolist(), tr.pressure,
                                                                title=f"{name}: pressure, features x steps")
        figs[f"{name}-events-by-pair"] = F.pair_events_figure(events_by_pair(load_events(path)),
                                                              title=f"{name}: competition by pair")
    return figs


def write_bundle(root: str | os.PathLike | None = None, figures: Mapping[str, Any] | None = None,
                 formats: tuple[str, ...] = ("png", "svg"), runs: pd.DataFrame | None = None,
                 include_standard: bool = True, name: str | None = None,
                 compare: tuple[list[str], str] | None = None) -> Path:
    """Write results/exports/<name or timestamp>/: figures/<fig>.<fmt>, runs.md, runs.csv and
    README.md (the runs table in markdown, the settings, the list of figures). `compare` (runs,
    baseline): also compare.md and compare.csv (inspect.compare), in the README too. Returns the folder."""
    for f in formats:
        if f not in FORMATS:
            raise MsaeError(f"unknown figure format {f!r}: use one of {', '.join(FORMATS)}")
    df = runs if runs is not None else runs_table(root)
    out = exports_root(root) / safe_file_stem(name or time.strftime("writeup-%Y%m%d-%H%M%S"))
    (out / EXPORT_FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    figs = dict(standard_figures(root, df) if include_standard else {})
    figs.update(figures or {})
    skipped = sorted(k for k, f in figs.items() if F.is_empty(f))  # "nothing to draw" placeholders
    figs = {k: f for k, f in figs.items() if k not in skipped}
    written: list[str] = []
    configure_browser()
    import plotly.io as pio

    for fmt in formats if figs else ():
        items = list(figs.items())
        paths = [out / EXPORT_FIGURES_DIR / f"{safe_file_stem(k)}.{fmt}" for k, _ in items]
        try:  # one Chromium session for all figures of this format
            pio.write_images([f for _, f in items], paths, format=fmt, width=1100)
        except Exception as exc:  # noqa: BLE001
            raise MsaeError(f"cannot render figures as {fmt}: {exc}".splitlines()[0]) from exc
        written += [p.relative_to(out).as_posix() for p in paths]
    table = runs_markdown(df)
    (out / EXPORT_RUNS_MD).write_text(table)
    df.to_csv(out / EXPORT_RUNS_CSV, index=False)
    settings_cols = [c for c in ("name", "arch", "base", "beta", "tau", "lam", "k", "l1_coeff", "d_sae", "lr",
                                 "steps", "batch_size") if c in df.columns]
    readme = ["# msae write-up bundle", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
              f"`{results_root(root)}` ({len(df)} runs).", "", "## Runs and scores", "", table,
              "## Settings", "", runs_markdown(df, settings_cols), "## Figures", ""]
    readme += [f"- [{w}]({w})" for w in written]
    if skipped:
        readme += ["", "Left out, nothing to draw yet: " + ", ".join(skipped)]
    if not any(c in df.columns and df[c].notna().any() for c in SCORE_COLUMNS):
        readme[readme.index("## Runs and scores") + 1:readme.index("## Runs and scores") + 1] = [
            "", "_No run has eval results yet: `msae eval RUN` scores one._"]
    if compare is not None:
        from msae_core.inspect.compare import comparison, data_note, l0_hint, to_markdown, wide_table, write_comparison

        runs_, baseline = compare
        chosen = df[df["name"].isin(runs_)]
        long = comparison(chosen, baseline)
        wide = wide_table(long, baseline)
        note = "\n\n".join(n for n in (data_note(chosen), l0_hint(long, chosen)) if n)  # as msae compare says
        write_comparison(long, wide, baseline, out, note)
        readme += ["", f"## Comparison with {baseline}", "", to_markdown(wide, baseline, note)]
    (out / EXPORT_README).write_text("\n".join(readme) + "\n")
    return out
