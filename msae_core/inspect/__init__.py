"""Data and figures for the workbench pages, one module per concept. No Streamlit here, ever: the
pages (pages/*.py, through workbench/ui.py) call these functions inside their own caches and render
what they return.

    runs_table   the runs table, its filters and cache key; the activation stores
    run_files    readers of one run folder: config, metrics, events, trace snapshots, pairs, weights
    features     the cached activation sample and its queries: examples, histogram, co-firing,
                 output tokens, per-feature colours
    projection   UMAP (cached) and PCA maps of the decoder directions
    launch       the Launch page's validation of settings
    figures      plotly figure builders
    export       figures as PNG/SVG/PDF, tables as CSV, the write-up bundle

Readers never raise on what they find on disk. A missing, half-written, old or corrupt file gives
the empty value of the reader's return type (an empty DataFrame with its usual columns, [], {},
None) and, where a page must say why, the cause as a string inside the result: the `problem` of
`read_json_file`'s (value, problem), the runs table's and `list_stores`' `problem`, and
`Traces.problems`. Only what the user asked to compute raises, and only MsaeError with a one-line
cause (a bad run name, no or unreadable weights, an activation store or model that cannot be
opened): `run_path`, `load_run_sae`, `feature_sample`, `top_examples`, `output_tokens`,
`umap_coords`, `pca_coords`.

Derived per-run caches live in `<run>/workbench/` (names in msae_core.artifacts), safetensors
written atomically and keyed by the weights' fingerprint so that a retrained run recomputes them:
the feature sample (features.py) and the UMAP coordinates (projection.py).
"""
