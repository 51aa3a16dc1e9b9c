"""Plotly figure builders for the workbench (and for exports). No Streamlit here.

Every builder takes plain data (numpy arrays, dataframes) and returns a `plotly.graph_objects.Figure`;
an empty input gives a figure with a centred note instead of raising. `tokens_html` renders a
context with each token shaded by activation (token text is HTML-escaped).
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
FEATURE_COLOURS = ((31, 119, 180), (214, 39, 40))  # first and second feature of a pair
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]
RECONSTRUCTION_LABELS = {"explained_variance": "explained variance", "ce_loss_score": "CE-loss score",
                         "kl_div_score": "KL score",
                         "synth_explained_variance": "explained variance (synthetic rows)",
                         "synth_f1": "F1 against the true features", "synth_mcc": "MCC with the true features"}
# the trade-off's x axis: the absorption scores (lower is better)
ABSORPTION_LABELS = {"absorption": "mean absorption fraction (SAEBench)",
                     "absorption_full": "mean full absorption (SAEBench)",
                     "synth_absorption": "absorption, exact (synthetic ground truth)",
                     "synth_lost": "parent firings lost (synthetic ground truth)"}


EMPTY_META = "msae-empty"  # layout.meta of a figure that only says there is nothing to draw


def is_empty(fig: go.Figure) -> bool:
    """Whether `fig` is a placeholder saying there is nothing to draw (a write-up leaves it out)."""
    return getattr(fig.layout, "meta", None) == EMPTY_META


def _empty(note: str, title: str = "") -> go.Figure:
    fig = go.Figure(layout={"meta": EMPTY_META})
    fig.add_annotation(text=note, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 14})
    fig.update_layout(template=TEMPLATE, title=title, xaxis={"visible": False},
                      yaxis={"visible": False}, height=320)
    return fig


# ------------------------------------------------------------------------------------- trade-off
def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Indices of the points no other point beats on both axes (lower x, higher y), by x.
    NaN points never belong to the front."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.nonzero(np.isfinite(x) & np.isfinite(y))[0]
    order = ok[np.lexsort((-y[ok], x[ok]))]  # by x, ties: best y first
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)


COMPARABLE_BY = ("d_sae", "steps")  # runs that differ in these are not on one frontier


def comparable_groups(d: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs split by dictionary size and training length (a frontier joining a 4096-latent
    run to a 16384-latent one, or 1k steps to 100k, compares unlike things): (label, rows)."""
    cols = [c for c in COMPARABLE_BY if c in d.columns]
    if not cols:
        return [("", d)]
    keys = d[cols].astype(object).where(d[cols].notna(), "?")
    out = []
    for key, g in d.groupby([keys[c] for c in cols], sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append((", ".join(f"{c} {_short(v)}" for c, v in zip(cols, key)), g))
    return out


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _error_bars(d: pd.DataFrame, col: str) -> dict | None:
    """Plotly error bars from the columns `{col}_ci_low` / `{col}_ci_high` (an eval's confidence
    interval); None when no run has one. A run without one gets no bar."""
    lo, hi = f"{col}_ci_low", f"{col}_ci_high"
    if lo not in d or hi not in d or not (d[lo].notna() & d[hi].notna()).any():
        return None
    v = d[col].astype(float)
    return {"type": "data", "symmetric": False, "thickness": 1.2, "width": 3,
            "array": (d[hi].astype(float) - v).fillna(0).clip(lower=0).to_numpy(),
            "arrayminus": (v - d[lo].astype(float)).fillna(0).clip(lower=0).to_numpy()}


def tradeoff_figure(df: pd.DataFrame, y: str = "explained_variance", x: str = "absorption",
                    color: str | None = None, reference: pd.DataFrame | None = None,
                    frontier: bool = True, hover: Sequence[str] = ()) -> go.Figure:
    """Reconstruction (`y`) against absorption (`x`) for every run with both, coloured by `color`,
    the Pareto frontier (low absorption, high reconstruction) as a line, one per group of
    comparable runs (same d_sae and steps, `comparable_groups`), named by its group when there are several, reference points as
    crosses. Run traces share legendgroup "runs": one trace with a colour scale for a numeric
    `color` (runs without a value in grey), one trace per value for a categorical one. Each run's
    marker carries its name as customdata[0] (for click-to-open). Runs whose evals give a
    confidence interval (`{x}_ci_low`, `{x}_ci_high`, the same for y) get error bars."""
    ylab, xlab = RECONSTRUCTION_LABELS.get(y, y), ABSORPTION_LABELS.get(x, x)
    d = df[df[x].notna() & df[y].notna()] if len(df) and x in df and y in df else df.iloc[0:0]
    if d.empty and (reference is None or reference.empty):
        return _empty(f"no run has both {xlab} and {ylab} yet", f"{ylab} vs {xlab}")
    fig = go.Figure()
    hover_cols = [c for c in ("arch", "beta", "tau", "lam", "k", "l1_coeff", "d_sae", "l0", *hover)
                  if c in d.columns]
    if not d.empty:
        custom = d[["name"] + hover_cols].astype(object).where(d[["name"] + hover_cols].notna(), "-")
        tmpl = "<b>%{customdata[0]}</b><br>" + f"{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}" + "".join(
            f"<br>{c}=%{{customdata[{n + 1}]}}" for n, c in enumerate(hover_cols)) + "<extra></extra>"
        base_marker: dict[str, Any] = {"size": 11, "line": {"width": 1, "color": "#333"}}
        vals = d[color] if color and color in d.columns else None
        groups: list[tuple[str, pd.Series, dict[str, Any]]] = []  # (legend name, row mask, marker)
        if vals is None:
            groups.append(("runs", pd.Series(True, index=d.index), dict(base_marker)))
        elif pd.api.types.is_numeric_dtype(vals) and vals.notna().any():
            have = vals.notna()
            groups.append((f"runs (colour: {color})", have, {
                **base_marker, "color": vals[have].to_numpy(dtype=float), "colorscale": "Viridis",
                "showscale": True, "colorbar": {"title": color}}))
            if (~have).any():
                groups.append((f"{color}: n/a", ~have, {**base_marker, "color": "#bbbbbb"}))
        else:  # categorical: one legend entry per value
            cats = vals.astype(object).where(vals.notna(), "n/a").astype(str)
            for n, c in enumerate(sorted(cats.unique())):
                groups.append((f"{color}: {c}", cats == c, {**base_marker, "color": _PALETTE[n % len(_PALETTE)]}))
        for name, mask, marker in groups:
            g = d[mask]
            fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=name, legendgroup="runs",
                                     marker=marker, customdata=custom[mask].to_numpy(), hovertemplate=tmpl,
                                     error_x=_error_bars(g, x), error_y=_error_bars(g, y)))
        if frontier and len(d) > 1:
            groups_ = comparable_groups(d)
            for n, (label, g) in enumerate(groups_):
                if len(g) < 2:
                    continue
                fd = g.iloc[pareto_front(g[x].to_numpy(), g[y].to_numpy())]
                name = "Pareto frontier" + (f" ({label})" if len(groups_) > 1 else "")
                fig.add_trace(go.Scatter(x=fd[x], y=fd[y], mode="lines", name=name,
                                         line={"dash": ("dash", "dot", "dashdot", "longdash")[n % 4],
                                               "color": "#444"}, hoverinfo="skip"))
    if reference is not None and not reference.empty and x in reference and y in reference:
        r = reference[reference[x].notna() & reference[y].notna()]
        fig.add_trace(go.Scatter(
            x=r[x], y=r[y], mode="markers+text", name="research log (reported)",
            text=r.get("label", r.index.astype(str)), textposition="top center",
            marker={"symbol": "x", "size": 11, "color": "#d62728"},
            hovertemplate="%{text}<br>" + f"{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra>reported</extra>"))
    fig.update_layout(template=TEMPLATE, title=f"{ylab} vs {xlab}", xaxis_title=f"{xlab} (lower is better)",
                      yaxis_title=f"{ylab} (higher is better)", height=520, clickmode="event+select",
                      legend={"orientation": "h", "y": -0.15})
    return fig


# ----------------------------------------------------------------------------- training metrics
def metrics_figure(metrics: pd.DataFrame, keys: Sequence[str] = ("loss", "explained_variance", "l0",
                                                                   "competing_pairs"),
                   title: str = "") -> go.Figure:
    """One small panel per metric over steps."""
    keys = [k for k in keys if k in metrics.columns and metrics[k].notna().any()]
    if metrics.empty or "step" not in metrics or not keys:
        return _empty("no metrics logged yet", title)
    # each panel's title names its metric (a y-axis title would run into the panel to its left)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[_PANEL_LABELS.get(k, k) for k in keys],
                        horizontal_spacing=0.06)
    for n, k in enumerate(keys, start=1):
        fig.add_trace(go.Scatter(x=metrics["step"], y=metrics[k], mode="lines", name=k, showlegend=False,
                                 line={"color": _PALETTE[(n - 1) % len(_PALETTE)]}), row=1, col=n)
        fig.update_xaxes(title_text="step", row=1, col=n)
        if k in _COUNTS:
            fig.update_yaxes(rangemode="tozero", row=1, col=n)
    fig.update_layout(template=TEMPLATE, title=title, height=300, margin={"t": 50, "b": 40})
    return fig


CURVE_LABELS = {"loss": "training loss", "explained_variance": "explained variance (batch)", "l0": "L0 (batch)",
                "dead_features": "dead latents (silent for dead_tokens_threshold tokens)", "competing_pairs": "competing pairs", "mse": "MSE (normalised)",
                "outlier_rows": "outlier rows per step"}
_PANEL_LABELS = {**CURVE_LABELS, "dead_features": "dead latents (training window)"}
_COUNTS = ("l0", "dead_features", "competing_pairs", "outlier_rows")  # counts: their axes start at 0


def curves_figure(runs: dict[str, pd.DataFrame], y: str, x: str = "step", title: str = "") -> go.Figure:
    """Training curves of several runs overlaid: metric `y` of each run's metrics.jsonl against its
    steps, or against its L0 (`x` "l0", the trade-off as SAEBench plots it), one line a run."""
    fig = go.Figure()
    for n, (name, m) in enumerate(runs.items()):
        if m.empty or y not in m or x not in m:
            continue
        d = m[list(dict.fromkeys([x, y, "step"]))].dropna()  # a column once, also when y is x
        if d.empty:
            continue
        fig.add_trace(go.Scatter(x=d[x], y=d[y], mode="lines" if x == "step" else "lines+markers", name=name,
                                 line={"color": _PALETTE[n % len(_PALETTE)]},
                                 hovertemplate=f"<b>{name}</b><br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<extra></extra>"))
    if not fig.data:
        return _empty(f"no chosen run has logged {y} yet", title)
    fig.update_layout(template=TEMPLATE, title=title or f"{CURVE_LABELS.get(y, y)} by {x}", height=440,
                      xaxis_title="step" if x == "step" else CURVE_LABELS.get(x, x),
                      yaxis_title=CURVE_LABELS.get(y, y), legend={"orientation": "h", "y": -0.2})
    return fig


# ---------------------------------------------------------------------------------- traces
def traces_figure(steps: np.ndarray, features: Sequence[int], rate: np.ndarray, mag: np.ndarray,
                  pressure: np.ndarray, title: str = "momentum traces") -> go.Figure:
    """rate, mag and pressure (each (n_features, n_steps)) of chosen features over steps."""
    if len(steps) == 0 or len(features) == 0:
        return _empty("no trace snapshots for these features", title)
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("firing rate", "mean activation (mag)", "competition pressure"))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    for n, f in enumerate(features):
        c = palette[n % len(palette)]
        for row, arr in enumerate((rate, mag, pressure), start=1):
            fig.add_trace(go.Scatter(x=steps, y=arr[n], mode="lines", name=f"feature {f}", legendgroup=str(f),
                                     showlegend=row == 1, line={"color": c}), row=row, col=1)
    fig.update_layout(template=TEMPLATE, title=title, height=640)
    fig.update_xaxes(title_text="step", row=3, col=1)
    for row, name in enumerate(("firing rate", "mag", "pressure"), start=1):
        fig.update_yaxes(title_text=name, row=row, col=1)
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    return fig


def heatmap_figure(steps: np.ndarray, features: Sequence[int], values: np.ndarray,
                   title: str = "pressure: features x steps", quantity: str = "pressure") -> go.Figure:
    """values (n_features, n_steps) of `quantity` as a heatmap, one row per feature; the colour
    scale starts at 0 (the traces are rates, magnitudes and pressures, none negative) and its bar
    is titled, so a screen and an exported file read alike."""
    if len(steps) == 0 or len(features) == 0:
        return _empty("no trace snapshots", title)
    z = np.asarray(values, dtype=float)
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=[str(f) for f in features], colorscale="Magma",
                               zmin=min(0.0, float(np.nanmin(z)) if np.isfinite(z).any() else 0.0),
                               zmax=top if top > 0 else 1.0, colorbar={"title": quantity},
                               hovertemplate="feature %{y}<br>step %{x}<br>" + quantity + " %{z:.4g}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="step", yaxis_title="feature",
                      yaxis={"type": "category"}, height=max(320, min(900, 16 * len(features) + 120)))
    return fig


def events_figure(events: pd.DataFrame, title: str = "competition events") -> go.Figure:
    """Each event at its step: upward crossings of tau above, downward below (pair in hover)."""
    if events.empty or "step" not in events:
        return _empty("no competition events logged", title)
    d = events.copy()
    direction = d["direction"].astype(str).str.lower() if "direction" in d else pd.Series("up", index=d.index)
    up = direction.isin(["up", "1", "+1", "enter", "start", "true"])
    kappa = d["kappa"] if "kappa" in d else pd.Series(np.nan, index=d.index)
    fig = go.Figure()
    for mask, name, sym, col in ((up, "starts competing (kappa up through tau)", "triangle-up", "#d62728"),
                                 (~up, "stops competing (kappa down through tau)", "triangle-down", "#1f77b4")):
        s = d[mask]
        if s.empty:
            continue
        fig.add_trace(go.Scattergl(
            x=s["step"], y=kappa[mask], mode="markers", name=name, marker={"symbol": sym, "size": 8, "color": col},
            customdata=np.stack([s["i"], s["j"]], axis=1),
            hovertemplate="step %{x}<br>pair (%{customdata[0]}, %{customdata[1]})<br>kappa %{y:.3f}<extra></extra>"))
    counts = d.groupby("step").size()
    fig.add_trace(go.Bar(x=counts.index, y=counts.values, name="events per step", yaxis="y2", opacity=0.3,
                         marker={"color": "#888"}))
    most = int(counts.max()) if len(counts) else 1
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="step",
                      yaxis={"title": "kappa", "rangemode": "tozero"},
                      yaxis2={"overlaying": "y", "side": "right", "title": "events per step", "showgrid": False,
                              "rangemode": "tozero", "dtick": max(1, math.ceil(most / 5)), "tickformat": "d"},
                      height=380, legend={"orientation": "h", "y": -0.25})
    return fig


def pair_events_figure(by_pair: pd.DataFrame, top: int = 60, title: str = "competition by pair") -> go.Figure:
    """The `top` pairs with the most crossings (run_files.events_by_pair), one row each: a segment
    from its first to its last crossing of tau, coloured by how many crossings lie between (many:
    kappa flapping around tau), a marker at its end (up: still competing, down: stopped)."""
    if by_pair.empty:
        return _empty("no competition events logged", title)
    d = by_pair.head(top).iloc[::-1]  # most crossings at the top
    labels = [f"{i} & {j}" for i, j in zip(d["i"], d["j"])]
    xs, ys = [], []
    for lab, a, b in zip(labels, d["first"], d["last"]):
        xs += [a, b, None]
        ys += [lab, lab, None]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#bbb", "width": 2}, hoverinfo="skip",
                               showlegend=False))
    custom = np.stack([d["first"], d["last"], d["crossings"], d["ups"], d["downs"]], axis=1)
    fig.add_trace(go.Scatter(
        x=d["last"], y=labels, mode="markers", name="last crossing (up: still competing, down: stopped)",
        marker={"size": 9, "symbol": np.where(d["ends_competing"], "triangle-up", "triangle-down"),
                "color": d["crossings"], "colorscale": "Viridis", "showscale": True, "cmin": 1,
                "cmax": max(2, int(d["crossings"].max())),
                "colorbar": {"title": "crossings of tau", "dtick": max(1, math.ceil(int(d["crossings"].max()) / 5))}},
        customdata=custom,
        hovertemplate="pair %{y}<br>first crossing %{customdata[0]}, last %{customdata[1]}<br>"
                      "%{customdata[2]} crossings (%{customdata[3]} up, %{customdata[4]} down)<extra></extra>"))
    flapping = int((by_pair["crossings"] > 2).sum())
    fig.update_layout(template=TEMPLATE, height=max(320, 16 * len(d) + 140), xaxis_title="step",
                      yaxis={"title": "pair (latents i & j)", "type": "category", "dtick": 1},
                      legend={"orientation": "h", "y": -0.12, "x": 0},
                      title=f"{title} ({len(by_pair)} pairs, {flapping} crossing tau more "
                                                f"than twice; top {len(d)} shown)")
    return fig


# ------------------------------------------------------------------------------ feature explorer
def umap_figure(coords: np.ndarray, values: np.ndarray | None = None, colour_name: str = "",
                selected: int | None = None, title: str = "decoder directions (UMAP)",
                layout: str = "UMAP") -> go.Figure:
    """WebGL scatter of (F, 2) coordinates; customdata is the feature id (for click-to-select).
    The axes are named after the `layout` that made the coordinates (UMAP or PCA); their values
    carry no meaning, so they have no tick labels."""
    if coords is None or len(coords) == 0:
        return _empty("no UMAP coordinates", title)
    ids = np.arange(len(coords))
    marker: dict[str, Any] = {"size": 4 if len(coords) > 2000 else 7, "opacity": 0.8}
    if values is not None and len(values) == len(coords):
        marker.update(color=np.nan_to_num(values, nan=float(np.nanmin(values)) if np.isfinite(values).any() else 0.0),
                      colorscale="Viridis", showscale=True, colorbar={"title": colour_name})
    fig = go.Figure(go.Scattergl(x=coords[:, 0], y=coords[:, 1], mode="markers", marker=marker,
                                 customdata=ids, name="features",
                                 hovertemplate="feature %{customdata}" + (f"<br>{colour_name} %{{marker.color:.3g}}"
                                                                          if "color" in marker else "")
                                 + "<extra></extra>"))
    if selected is not None and 0 <= selected < len(coords):
        fig.add_trace(go.Scattergl(x=[coords[selected, 0]], y=[coords[selected, 1]], mode="markers",
                                   marker={"size": 16, "symbol": "circle-open", "color": "#d62728",
                                           "line": {"width": 3}}, name=f"feature {selected}", hoverinfo="skip"))
    fig.update_layout(template=TEMPLATE, title=title, height=560,
                      xaxis={"showticklabels": False, "title": f"{layout} 1"},
                      yaxis={"showticklabels": False, "title": f"{layout} 2"}, dragmode="pan",
                      legend={"orientation": "h", "y": -0.04, "x": 0})
    return fig


def histogram_figure(counts: np.ndarray, edges: np.ndarray, feature: int, fraction: float) -> go.Figure:
    title = f"feature {feature}: activations where it fires ({fraction:.3%} of sampled tokens)"
    if len(counts) == 0:
        return _empty("never fires on the sample", title)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), marker={"color": "#1f77b4"}))
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="activation", yaxis_title="tokens",
                      height=300, bargap=0)
    return fig


def logits_figure(promoted: Sequence[tuple], suppressed: Sequence[tuple], feature: int) -> go.Figure:
    """Top promoted and suppressed output tokens of a feature, as two bar panels. Items are
    (token, logit) or (token, logit, token id); the id is shown so that tokens decoding to the same
    text (byte pieces, '\ufffd') stay separate bars."""
    title = f"feature {feature}: output tokens through the unembedding"
    if not promoted and not suppressed:
        return _empty("no output tokens", title)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("promoted", "suppressed"), horizontal_spacing=0.25)
    for col, items, c in ((1, promoted, "#2ca02c"), (2, suppressed, "#d62728")):
        labels, seen = [], {}
        for n, item in enumerate(items):
            text = repr(str(item[0]))[1:-1] or "''"
            label = f"{text} ({item[2]})" if len(item) > 2 else text
            seen[label] = seen.get(label, 0) + 1
            labels.append(label if seen[label] == 1 else f"{label} [{seen[label]}]")
        fig.add_trace(go.Bar(x=[float(item[1]) for item in items][::-1], y=labels[::-1], orientation="h",
                             marker={"color": c}, showlegend=False,
                             hovertemplate="%{y}: %{x:.4g}<extra></extra>"), row=1, col=col)
    fig.update_yaxes(type="category")
    fig.update_xaxes(title_text="logit (direct path, unit decoder direction)")
    fig.update_layout(template=TEMPLATE, title=title, height=max(300, 24 * max(len(promoted), 1) + 100))
    return fig


def match_cosine_figure(cosines: np.ndarray, a: str, b: str) -> go.Figure:
    """The SAE diff's match quality: a histogram of each A latent's decoder cosine with its partner
    in B, in fixed bins of 0.025 over [0, 1] (from -1 when a match is negative), so that the
    figures of two diffs compare."""
    c = np.asarray(cosines, dtype=float)
    c = c[np.isfinite(c)]
    lo = -1.0 if len(c) and c.min() < 0 else 0.0
    fig = go.Figure(go.Histogram(x=c, xbins={"start": lo, "end": 1.0, "size": 0.025}, marker={"color": "#1f77b4"}))
    fig.update_layout(template=TEMPLATE, height=300, title=f"{a} vs {b}: decoder cosine of matched latents",
                      xaxis={"title": f"decoder cosine with its partner in {b}", "range": [lo, 1.0]},
                      yaxis_title=f"latents of {a}", bargap=0.05)
    return fig


def logit_histogram_figure(counts: np.ndarray, edges: np.ndarray, feature: int,
                           promoted: Sequence[tuple] = (), suppressed: Sequence[tuple] = ()) -> go.Figure:
    """The logits of the whole vocabulary through a feature's decoder direction, as Neuronpedia's
    logit histogram: the bars in the tails are the promoted (green) and suppressed (red) tokens."""
    title = f"feature {feature}: logits over the vocabulary"
    if len(counts) == 0:
        return _empty("no output logits", title)
    centres = (edges[:-1] + edges[1:]) / 2
    hi = min((float(t[1]) for t in promoted), default=np.inf)
    lo = max((float(t[1]) for t in suppressed), default=-np.inf)
    colours = [("#2ca02c" if e1 >= hi else "#d62728" if e0 <= lo else "#999999")
               for e0, e1 in zip(edges[:-1], edges[1:])]
    fig = go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), marker={"color": colours},
                           hovertemplate="logit %{x:.3g}: %{y} tokens<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title="logit (direct path)",
                      yaxis={"title": "vocabulary tokens", "type": "log", "dtick": 1},  # a tick a decade
                      height=300, bargap=0)
    return fig


# ------------------------------------------------------------------------------ token shading
def tokens_html(tokens: Sequence[str], acts: Sequence[float], vmax: float | None = None,
                rgb: tuple[int, int, int] = FEATURE_COLOURS[0], center: int | None = None) -> str:
    """Tokens as inline spans shaded by activation (alpha = act / vmax); hover shows the value."""
    vmax = vmax if vmax and vmax > 0 else max([a for a in acts if math.isfinite(a)] + [0.0]) or 1.0
    parts = []
    for n, (t, a) in enumerate(zip(tokens, acts)):
        alpha = 0.0 if not math.isfinite(a) else max(0.0, min(1.0, a / vmax))
        border = "border-bottom:2px solid #000;" if n == center else ""
        text = html.escape(t).replace("\n", "⏎").replace(" ", "&nbsp;") or "&#8203;"
        parts.append(f'<span title="{a:.3g}" style="background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f});'
                     f'{border}border-radius:2px;padding:0 1px;">{text}</span>')
    # adjacent spans with no space between them form one unbreakable word: long contexts would
    # overflow their column, so break anywhere, and let the flex item shrink (min-width 0)
    return ('<div style="font-family:monospace;font-size:0.85rem;line-height:1.7;white-space:normal;'
            'overflow-wrap:anywhere;word-break:break-all;min-width:0;flex:1 1 0;">' + "".join(parts) + "</div>")


def example_html(example: Any, features: Sequence[int], vmax: dict[int, float] | None = None,
                 colour_offset: int = 0) -> str:
    """One context (msae_core.inspect.features.Example) shaded once per feature, one line each."""
    rows = []
    for n, f in enumerate(features):
        rgb = FEATURE_COLOURS[(n + colour_offset) % len(FEATURE_COLOURS)]
        acts = example.acts.get(f, [0.0] * len(example.tokens))
        peak = max(acts) if acts else 0.0
        rows.append(f'<div style="display:flex;gap:6px;align-items:baseline;">'
                    f'<span style="min-width:7em;flex:0 0 auto;color:rgb{rgb};font-size:0.75rem;">#{f} max {peak:.3g}</span>'
                    + tokens_html(example.tokens, acts, (vmax or {}).get(f), rgb, example.center) + "</div>")
    return ('<div style="margin-bottom:8px;border-left:3px solid #ddd;padding-left:6px;max-width:100%;'
            'overflow:hidden;">' + "".join(rows) + "</div>")
