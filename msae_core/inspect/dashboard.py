"""One feature's dashboard as a file: everything the Feature explorer shows for a feature
(density and activation histogram, top, quantile and random examples token-shaded, output tokens
with their logit histogram, nearest and most correlated features, a momentum run's competing
partners), gathered once and written as a standalone HTML page or a PNG.

`msae dashboard RUN --features 3,17 --out DIR` writes `<run>-feature<N>.html` (and `.png` with
`--format html,png`); the HTML pages link to each other's files for the neighbours they list, and
share one `plotly.min.js` beside them, so they open offline."""

from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from msae_core.artifacts import DASHBOARD_PLOTLY_JS, DASHBOARDS_DIR
from msae_core.errors import MsaeError
from msae_core.inspect import features
from msae_core.inspect import figures as F
from msae_core.inspect.export import figure_bytes, safe_file_stem
from msae_core.inspect.projection import numpy_decoder_rows
from msae_core.inspect.run_files import load_pairs, load_run_sae

log = logging.getLogger(__name__)

DASHBOARD_FORMATS = ("html", "png")
_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto} table{border-collapse:collapse} "
        "td,th{padding:2px 10px;text-align:left} .problem{color:#a00}")


@dataclass
class Dashboard:
    """The data of one feature's dashboard; a section that could not be computed holds None and
    its reason in `problems`."""

    run: str
    feature: int
    n_rows: int | None = None
    fraction: float | None = None
    histogram: tuple[np.ndarray, np.ndarray] | None = None
    top: list = field(default_factory=list)
    quantiles: list = field(default_factory=list)
    random: list = field(default_factory=list)
    output: dict | None = None
    nearest: pd.DataFrame | None = None
    correlated: pd.DataFrame | None = None
    partners: pd.DataFrame | None = None
    problems: dict[str, str] = field(default_factory=dict)


def feature_dashboard(run_dir: str | os.PathLike, feature: int, sample: features.FeatureSample | None = None,
                      n_top: int = 8, k: int = 10, seed: int = 0, logits: bool = True) -> Dashboard:
    """Gather feature `feature`'s dashboard from a run folder (its cached activation sample unless
    one is given). MsaeError when the feature is out of range; any other section that fails (no
    store, no model for the logits) is left empty with its reason."""
    run_dir = Path(run_dir)
    d = Dashboard(run_dir.name, int(feature))
    d.nearest = features.nearest_by_decoder(run_dir, feature, k=k)  # also checks the range
    if sample is None:
        try:
            sample = features.feature_sample(run_dir)
        except MsaeError as exc:
            d.problems["examples"] = str(exc)
    if sample is not None:
        counts, edges, d.fraction = features.activation_histogram(sample, feature)
        d.n_rows, d.histogram = sample.n_rows, (counts, edges)
        try:
            d.top = features.top_examples(sample, feature, n=n_top)
            d.quantiles = features.quantile_examples(sample, feature, n_bins=5, per_bin=2, seed=seed)
            d.random = features.random_examples(sample, feature, n=4, seed=seed)
        except MsaeError as exc:
            d.problems["examples"] = str(exc)
        d.correlated = features.most_correlated(sample, feature, k=k)
    if logits:
        try:
            d.output = features.output_tokens(run_dir, feature, k=k)
        except MsaeError as exc:
            d.problems["output tokens"] = str(exc)
    pairs, _ = load_pairs(run_dir)
    if not pairs.empty:
        mine = pairs[(pairs["i"] == feature) | (pairs["j"] == feature)].copy()
        mine["partner"] = mine["j"].where(mine["i"] == feature, mine["i"])
        d.partners = mine[["partner", "kappa", "dec_cos"]].reset_index(drop=True)
    return d


def dashboard_file_stem(run: str, feature: int) -> str:
    return safe_file_stem(f"{run}-feature{int(feature)}")


def _panels(d: Dashboard) -> list[tuple[Any, int]]:
    """The dashboard's figures, each with the columns it spans in the PNG's grid (2: full width;
    1: the output tokens, whose promoted and suppressed panels sit side by side)."""
    panels: list[tuple[Any, int]] = []
    if d.histogram is not None:
        panels.append((F.histogram_figure(*d.histogram, d.feature, d.fraction or 0.0), 2))
    if d.output is not None:
        panels.append((F.logits_figure(d.output["promoted"], d.output["suppressed"], d.feature), 1))
        panels.append((F.logit_histogram_figure(*d.output["histogram"], d.feature, d.output["promoted"],
                                                d.output["suppressed"]), 2))
    return panels


def _feature_table(df: pd.DataFrame | None, col: str, link: Callable[[int], str | None] | None) -> str:
    if df is None or df.empty:
        return "<p><i>none</i></p>"
    rows = []
    for f, v in zip(df.iloc[:, 0].astype(int), df[col].astype(float)):
        href = link(f) if link else None
        name = f'<a href="{html.escape(href)}">feature {f}</a>' if href else f"feature {f}"
        rows.append(f"<tr><td>{name}</td><td>{v:.3f}</td></tr>")
    return f"<table><tr><th>feature</th><th>{html.escape(col)}</th></tr>{''.join(rows)}</table>"


def dashboard_html(d: Dashboard, plotly_js: str = "inline", link: Callable[[int], str] | None = None) -> str:
    """A standalone HTML page of the dashboard. `plotly_js`: "inline" embeds plotly.js (one file
    that opens anywhere), or a path/URL the page loads it from; `link(f)` the href of feature f's
    page, or None where there is no page to link to (None: neighbours are not links)."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    parts = [f"<h1>{html.escape(d.run)}: feature {d.feature}</h1>"]
    if d.fraction is not None:
        parts.append(f"<p>Activation density: fires on <b>{d.fraction:.3%}</b> of {d.n_rows:,} sampled tokens.</p>")
    for what, why in d.problems.items():
        parts.append(f"<p class='problem'>{html.escape(what)} unavailable: {html.escape(why)}</p>")
    for fig, _ in _panels(d):
        parts.append(pio.to_html(fig, include_plotlyjs=False, full_html=False))

    def examples(title: str, exs: list) -> None:
        if exs:
            parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(F.example_html(e, [d.feature]) for e in exs))

    examples("Top activating contexts", d.top)
    for lo, hi, exs in d.quantiles:
        examples(f"Activation {lo:.3g} to {hi:.3g} (quantile bin)", exs)
    examples("Random positive examples", d.random)
    parts.append("<div style='display:flex;gap:3em'><div><h2>Nearest by decoder cosine</h2>"
                 + _feature_table(d.nearest, "decoder_cos", link) + "</div><div><h2>Most correlated by "
                 "activation</h2>" + _feature_table(d.correlated, "pearson", link) + "</div></div>")
    if d.partners is not None:
        parts.append(f"<h2>Competing partners ({len(d.partners)})</h2>"
                     + _feature_table(d.partners[["partner", "kappa"]], "kappa", link))
    script = (f"<script>{get_plotlyjs()}</script>" if plotly_js == "inline"
              else f'<script src="{html.escape(plotly_js)}"></script>')
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(d.run)} feature {d.feature}</title>{script}<style>{_CSS}</style></head>"
            "<body>" + "".join(parts) + "</body></html>")


def dashboard_figure(d: Dashboard, contexts: int = 6) -> Any:
    """The dashboard as one figure for a PNG: activation histogram, promoted and suppressed output
    tokens side by side, the logit histogram, and the top contexts as text with the token they
    were chosen for in «guillemets» (the token shading needs the HTML)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = _panels(d)
    top = d.top[:contexts]
    heights = [float(f.layout.height or 300) for f, _ in panels] + [60.0 + 34 * max(len(top), 1)]
    specs, titles = [], []
    for fig, span in panels:
        if span == 2:
            specs.append([{"type": "xy", "colspan": 2}, None])
            titles += [fig.layout.title.text or ""]
        else:
            specs.append([{"type": "xy"}, {"type": "xy"}])
            titles += ["promoted output tokens", "suppressed output tokens"]
    specs.append([{"type": "table", "colspan": 2}, None])
    titles.append("top activating contexts")
    out = make_subplots(rows=len(specs), cols=2, row_heights=heights, vertical_spacing=0.05,
                        horizontal_spacing=0.22, specs=specs, subplot_titles=titles)
    for r, (fig, span) in enumerate(panels, start=1):
        for n, t in enumerate(fig.data):
            col = 1 if span == 2 else n + 1
            out.add_trace(t, row=r, col=col)
            out.update_xaxes(title_text=fig.layout.xaxis.title.text, row=r, col=col)
        if span == 2:
            out.update_yaxes(title_text=fig.layout.yaxis.title.text, type=fig.layout.yaxis.type,
                             dtick=fig.layout.yaxis.dtick, row=r, col=1)
        else:
            out.update_yaxes(type="category", row=r, col=1)
            out.update_yaxes(type="category", row=r, col=2)
    peaks = [f"{e.acts[d.feature][e.center]:.3g}" for e in top]
    texts = ["".join(e.tokens[:e.center]) + "«" + e.tokens[e.center] + "»" + "".join(e.tokens[e.center + 1:])
             for e in top]
    texts = [t.replace("\n", "⏎")[-140:] for t in texts]
    out.add_trace(go.Table(header={"values": ["max", "context («the token it fires on»)"]},
                           cells={"values": [peaks, texts], "align": "left", "height": 28},
                           columnwidth=[1, 9]), row=len(specs), col=1)
    title = f"{d.run}: feature {d.feature}" + (f" (fires on {d.fraction:.3%} of sampled tokens)"
                                                if d.fraction is not None else "")
    out.update_layout(template=F.TEMPLATE, title=title, height=int(sum(heights) * 1.15 + 120), showlegend=False,
                      bargap=0)
    return out


def write_dashboards(run_dir: str | os.PathLike, feature_ids: list[int], out: str | os.PathLike,
                     formats: tuple[str, ...] = ("html",), progress: bool = False) -> list[Path]:
    """Write each feature's dashboard into `out` (one sample, one model load for all); returns the
    files written. The HTML pages link to `<run>-feature<N>.html` for the features they list
    whose page this call writes or `out` already holds; the others are named, not linked."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    bad = [f for f in formats if f not in DASHBOARD_FORMATS]
    if bad or not formats:
        raise MsaeError(f"unknown dashboard format {', '.join(bad) or '(none)'}: use html, png or both")
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "html" in formats:
        from plotly.offline import get_plotlyjs

        js = out / DASHBOARD_PLOTLY_JS
        if not js.is_file():
            js.write_text(get_plotlyjs(), encoding="utf-8")
    try:
        sample = features.feature_sample(run_dir)
    except MsaeError as exc:
        log.warning("no activation sample for %s (%s): dashboards without examples", run_dir.name, exc)
        sample = None
    from tqdm import tqdm

    writing = set(feature_ids)

    def link(g: int) -> str | None:
        name = f"{dashboard_file_stem(run_dir.name, g)}.html"
        return name if g in writing or (out / name).is_file() else None

    for f in tqdm(feature_ids, desc="dashboards", unit="feature", disable=not progress):
        d = feature_dashboard(run_dir, f, sample=sample)
        stem = dashboard_file_stem(d.run, f)
        if "html" in formats:
            p = out / f"{stem}.html"
            p.write_text(dashboard_html(d, DASHBOARD_PLOTLY_JS, link=link), encoding="utf-8")
            written.append(p)
        if "png" in formats:
            fig = dashboard_figure(d)
            p = out / f"{stem}.png"
            p.write_bytes(figure_bytes(fig, "png", width=1100, height=int(fig.layout.height), scale=1.5))
            written.append(p)
    return written


def parse_features(text: str, d_sae: int | None = None) -> list[int]:
    """"3,17,40-45" -> [3, 17, 40, ..., 45]; MsaeError naming what is not a feature number."""
    got: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                if lo < 0 or (d_sae is not None and hi >= d_sae):  # checked before it is expanded
                    raise MsaeError(f"--features: {part} is out of range [0, {d_sae})")
                got.extend(range(lo, hi + 1))
            else:
                got.append(int(part))
        except ValueError:
            raise MsaeError(f"--features: {part!r} is not a feature number or a range like 40-45") from None
    if not got:
        raise MsaeError("--features names no feature")
    out_of_range = [f for f in got if f < 0 or (d_sae is not None and f >= d_sae)]
    if out_of_range:
        raise MsaeError(f"--features: {out_of_range[0]} is out of range [0, {d_sae})")
    return list(dict.fromkeys(got))


def _run(args) -> int:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise MsaeError(f"{run_dir} is not a run folder")
    feats = parse_features(args.features, numpy_decoder_rows(load_run_sae(run_dir)).shape[0])
    written = write_dashboards(run_dir, feats, args.out or run_dir / DASHBOARDS_DIR,
                               tuple(args.format.split(",")), progress=True)
    for p in written:
        print(p)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard", help="write features' dashboards as HTML pages (and PNGs)",
        description="Write one dashboard per feature: density, activation histogram, top, quantile and "
                    "random examples, output tokens and their logit histogram, nearest and most correlated "
                    "features (linked), a momentum run's competing partners.")
    p.add_argument("run", metavar="RUN", help="a run folder")
    p.add_argument("--features", required=True, help="feature numbers and ranges, e.g. 3,17,40-45")
    p.add_argument("--out", default="", help="folder for the files (default: RUN/dashboards)")
    p.add_argument("--format", default="html", help="html, png or html,png (PNG renders through kaleido)")
    p.set_defaults(func=_run)
