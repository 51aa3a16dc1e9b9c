"""Labelled text datasets for the sparse-probing eval.

Online, these are SAEBench's datasets by name (sae_bench/sae_bench_utils/dataset_utils.py and
dataset_info.py): bias in bios (three sets of five professions, balanced by gender), Amazon review
categories (balanced by rating) and sentiment, GitHub code languages, AG News topics and Europarl
languages, streamed through `datasets`. SAEBench loads whole splits into pandas and samples them;
we stream each split through a seeded shuffle buffer and take the first rows of each class, so the
texts differ from SAEBench's draw while the classes, columns and balancing follow it.

Offline (the default: these machines have no network), the suite is built from real labelled text
that the set-up installs from Debian packages and the Python install itself:

- `fortunes-topics`: topic classification over five English fortune topic files (package fortunes).
- `fortunes-languages`: language identification over Debian's fortunes in English, German, Spanish
  and Italian (packages fortunes, fortunes-de, fortunes-es, fortunes-it).
- `code-vs-prose`: snippets of the Python standard library's own source (the base interpreter's
  `sysconfig.get_paths()["stdlib"]`; tests, codec tables and generated files left out) against English fortunes, each code
  snippet cut to the length of a prose text so length alone does not separate the classes.

Sizes follow SAEBench's meaning: `n_train` is `probe_train_set_size`, the size of one binary
(one-vs-rest) probing task, so each class gets `n_train // 2` texts (and `n_test // 2` test texts);
the eval pairs a class's texts with as many drawn from the other classes. Texts are whitespace-
normalised and deduplicated, a text found under two classes is dropped, and train and test never
share a text (code snippets never share a source file). Everything is deterministic per seed.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

MIN_CHARS = 20  # shorter texts ("Yes.", a bare signature) carry too few tokens to probe


@dataclass(frozen=True)
class ProbeDataset:
    """A labelled dataset with balanced splits: every class has the same number of train texts
    (and of test texts). `train`/`test` are (text, label) pairs in a seeded shuffled order."""

    name: str
    provenance: dict
    classes: tuple[str, ...]
    train: list[tuple[str, str]] = field(repr=False)
    test: list[tuple[str, str]] = field(repr=False)

    def by_class(self, split: str) -> dict[str, list[str]]:
        """{class: [texts]} of "train" or "test", classes in `self.classes` order."""
        rows = {"train": self.train, "test": self.test}[split]
        out: dict[str, list[str]] = {c: [] for c in self.classes}
        for text, label in rows:
            out[label].append(text)
        return out


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _rng(seed: int, *parts: str) -> random.Random:
    # a str seed is hashed with SHA-512 by `random`: stable across processes and machines
    return random.Random("/".join([str(seed), *parts]))


def _clean_pools(pools: dict[str, list[str]]) -> dict[str, list[str]]:
    """Deduplicate per class (order kept) and drop texts that occur under more than one class."""
    seen: dict[str, set[str]] = {}
    out: dict[str, list[str]] = {}
    for cls, texts in pools.items():
        keep = []
        mine: set[str] = set()
        for t in texts:
            key = _normalise(t)
            if len(key) < MIN_CHARS or key in mine:
                continue
            mine.add(key)
            keep.append(t)
        out[cls] = keep
        seen[cls] = mine
    shared = set()
    classes = list(out)
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            shared |= seen[a] & seen[b]
    if shared:
        out = {c: [t for t in ts if _normalise(t) not in shared] for c, ts in out.items()}
    return out


def _per_class(name: str, n_train: int, n_test: int) -> tuple[int, int]:
    tr, te = int(n_train) // 2, int(n_test) // 2
    if tr < 1 or te < 1:
        raise MsaeError(f"{name}: probe_train_set_size and probe_test_set_size must be at least 2 "
                        f"(got {n_train} and {n_test}); each class gets half of each")
    return tr, te


def _need(name: str, cls: str, have: int, tr: int, te: int, hint: str = "") -> None:
    if have < tr + te:
        raise MsaeError(f"{name}: class {cls!r} has only {have} usable texts but {tr} train + {te} "
                        f"test per class were asked for (probe_train_set_size {2 * tr}, "
                        f"probe_test_set_size {2 * te}); lower them{hint}")


def _split(name: str, pools: dict[str, list[str]], tr: int, te: int, seed: int,
           provenance: dict) -> ProbeDataset:
    """Balanced, disjoint train/test from per-class pools (already cleaned), shuffled by seed."""
    train: list[tuple[str, str]] = []
    test: list[tuple[str, str]] = []
    for cls, texts in pools.items():
        _need(name, cls, len(texts), tr, te)
        order = list(range(len(texts)))
        _rng(seed, name, cls).shuffle(order)
        train += [(texts[i], cls) for i in order[:tr]]
        test += [(texts[i], cls) for i in order[tr:tr + te]]
    _rng(seed, name, "train").shuffle(train)
    _rng(seed, name, "test").shuffle(test)
    prov = {**provenance, "seed": seed, "train_per_class": tr, "test_per_class": te,
            "available_per_class": {c: len(t) for c, t in pools.items()},
            "min_chars": MIN_CHARS,
            "cleaning": "whitespace-normalised duplicates dropped; texts under two classes dropped"}
    return ProbeDataset(name, prov, tuple(pools), train, test)


# ----------------------------------------------------------------------------------------------
# offline datasets: Debian fortunes and the Python standard library

TOPICS = ("computers", "men-women", "politics", "science", "work")
LANGUAGES = ("en", "de", "es", "it")
# fortunes left out of the prose class: they hold code or drawings, not prose
PROSE_EXCLUDED = ("perl", "ascii-art")


def _fortune_provenance(corpus) -> dict:
    p = corpus.provenance
    return {k: p.get(k) for k in ("source", "language", "root", "packages", "sha256", "n_documents")}


def _fortunes_topics(n_train: int, n_test: int, seed: int) -> ProbeDataset:
    from msae_core.data.text import load_fortunes

    name = "fortunes-topics"
    tr, te = _per_class(name, n_train, n_test)
    corpus = load_fortunes("en", labels=TOPICS, shuffle_seed=None)
    pools: dict[str, list[str]] = {t: [] for t in TOPICS}
    for doc in corpus.documents():
        pools[doc.label].append(doc.text)
    missing = [t for t, v in pools.items() if not v]
    if missing:
        raise MsaeError(f"{name}: the English fortunes lack topic file(s) {', '.join(missing)}; "
                        f"install them with `sudo apt-get install fortunes`")
    prov = {"task": "topic of an English fortune (its Debian topic file)", "topics": list(TOPICS),
            "fortunes": _fortune_provenance(corpus)}
    return _split(name, _clean_pools(pools), tr, te, seed, prov)


def _fortunes_languages(n_train: int, n_test: int, seed: int) -> ProbeDataset:
    from msae_core.data.text import load_fortunes

    name = "fortunes-languages"
    tr, te = _per_class(name, n_train, n_test)
    pools: dict[str, list[str]] = {}
    prov_langs = {}
    for lang in LANGUAGES:
        corpus = load_fortunes(lang, shuffle_seed=None)
        pools[lang] = [d.text for d in corpus.documents()]
        prov_langs[lang] = _fortune_provenance(corpus)
    prov = {"task": "language of a fortune (English, German, Spanish, Italian Debian fortunes)",
            "fortunes": prov_langs}
    return _split(name, _clean_pools(pools), tr, te, seed, prov)


def stdlib_root() -> Path:
    """The base interpreter's standard library folder (a venv points at its base Python's)."""
    return Path(sysconfig.get_paths()["stdlib"])


# installed packages and tests (Debian ships the test suite apart); codec tables (encodings/) and
# generated files are data, and pydoc_data/ is documentation text, not code
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings", "pydoc_data"}
_SKIP_FILE_PREFIXES = ("_sysconfigdata",)


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, test folders and installed packages left out, sorted."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS for part in rel[:-1]) or p.name.startswith(_SKIP_FILE_PREFIXES):
            continue
        if not p.is_file():
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


SKIP_HEAD_CHARS = 150  # SAEBench skips ~50 tokens (150 characters) of each file: licence headers


def _code_snippet(source: str, target_chars: int, rng: random.Random) -> str | None:
    """Whole lines of `source` from a random line past its head, about `target_chars` long."""
    lines = source.splitlines()
    offsets, pos = [], 0
    for ln in lines:
        offsets.append(pos)
        pos += len(ln) + 1
    starts = [i for i, off in enumerate(offsets) if off >= SKIP_HEAD_CHARS and lines[i].strip()]
    if not starts:
        return None
    start = rng.choice(starts)
    out, size = [], 0
    for ln in lines[start:]:
        if size >= target_chars:
            break
        out.append(ln)
        size += len(ln) + 1
    text = "\n".join(out).rstrip()
    return text if size >= min(target_chars, 4 * MIN_CHARS) and len(_normalise(text)) >= MIN_CHARS else None


def _code_vs_prose(n_train: int, n_test: int, seed: int) -> ProbeDataset:
    from msae_core.data.text import load_fortunes

    name = "code-vs-prose"
    tr, te = _per_class(name, n_train, n_test)
    corpus = load_fortunes("en", shuffle_seed=None)
    prose = [d.text for d in corpus.documents() if d.label not in PROSE_EXCLUDED]
    prose_pool = _clean_pools({"prose": prose})["prose"]
    _need(name, "prose", len(prose_pool), tr, te)

    root = stdlib_root()
    files = stdlib_files(root)
    # files split into train and test first, so no source file feeds both
    order = list(range(len(files)))
    _rng(seed, name, "files").shuffle(order)
    lengths = [len(t) for t in prose_pool]
    rng = _rng(seed, name, "snippets")
    listing = hashlib.sha256()
    for p in files:
        listing.update(p.relative_to(root).as_posix().encode() + b"\0")

    pos = 0
    seen: set[str] = set()

    def take(n: int) -> tuple[list[str], list[str]]:
        """n snippets from the next files in seeded order (one snippet per file)."""
        nonlocal pos
        texts, used = [], []
        while len(texts) < n and pos < len(order):
            path = files[order[pos]]
            pos += 1
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            target = min(max(rng.choice(lengths), 4 * MIN_CHARS), 1000)
            s = _code_snippet(source, target, rng)
            if s is None or _normalise(s) in seen:
                continue
            seen.add(_normalise(s))
            texts.append(s)
            used.append(path.relative_to(root).as_posix())
        return texts, used

    # train snippets come from the first files in seeded order, test ones from the files after them
    code_train, train_files = take(tr)
    code_test, test_files = take(te)
    if len(code_train) < tr or len(code_test) < te:
        raise MsaeError(f"{name}: the Python standard library at {root} gave only "
                        f"{len(code_train) + len(code_test)} code snippets ({len(files)} source files) "
                        f"but {tr} train + {te} test were asked for; lower "
                        "probe_train_set_size/probe_test_set_size")
    p_order = list(range(len(prose_pool)))
    _rng(seed, name, "prose").shuffle(p_order)
    prose_train = [prose_pool[i] for i in p_order[:tr]]
    prose_test = [prose_pool[i] for i in p_order[tr:tr + te]]
    train = [(t, "code") for t in code_train] + [(t, "prose") for t in prose_train]
    test = [(t, "code") for t in code_test] + [(t, "prose") for t in prose_test]
    _rng(seed, name, "train").shuffle(train)
    _rng(seed, name, "test").shuffle(test)
    prov = {"task": "Python source code versus English prose",
            "code": {"source": "Python standard library source files", "root": str(root),
                     "python": sys.version.split()[0], "n_files": len(files),
                     "files_sha256": listing.hexdigest(),
                     "excluded_dirs": sorted(_SKIP_DIRS),
                     "excluded_file_prefixes": list(_SKIP_FILE_PREFIXES), "skip_head_chars": SKIP_HEAD_CHARS,
                     "snippet": "whole lines from a seeded random line past the head, cut to the "
                                "length of a randomly drawn prose text (80..1000 characters)",
                     "train_files": train_files, "test_files": test_files},
            "prose": {"source": "English Debian fortunes", "excluded_topics": list(PROSE_EXCLUDED),
                      "fortunes": _fortune_provenance(corpus)},
            "seed": seed, "train_per_class": tr, "test_per_class": te, "min_chars": MIN_CHARS}
    return ProbeDataset(name, prov, ("code", "prose"), train, test)


OFFLINE: dict[str, Callable[[int, int, int], ProbeDataset]] = {
    "fortunes-topics": _fortunes_topics,
    "fortunes-languages": _fortunes_languages,
    "code-vs-prose": _code_vs_prose,
}


# ----------------------------------------------------------------------------------------------
# SAEBench's datasets (Hugging Face, streamed)

# SAEBench's chosen classes (dataset_info.chosen_classes_per_dataset)
SAEBENCH: dict[str, dict] = {
    "LabHC/bias_in_bios_class_set1": {"hf": "LabHC/bias_in_bios", "text": "hard_text", "label": "profession",
                                      "balance": "gender", "classes": ["0", "1", "2", "6", "9"]},
    "LabHC/bias_in_bios_class_set2": {"hf": "LabHC/bias_in_bios", "text": "hard_text", "label": "profession",
                                      "balance": "gender", "classes": ["11", "13", "14", "18", "19"]},
    "LabHC/bias_in_bios_class_set3": {"hf": "LabHC/bias_in_bios", "text": "hard_text", "label": "profession",
                                      "balance": "gender", "classes": ["20", "21", "22", "25", "26"]},
    "canrager/amazon_reviews_mcauley_1and5": {"hf": "canrager/amazon_reviews_mcauley_1and5", "text": "text",
                                              "label": "category", "balance": "rating",
                                              "classes": ["1", "2", "3", "5", "6"]},
    "canrager/amazon_reviews_mcauley_1and5_sentiment": {"hf": "canrager/amazon_reviews_mcauley_1and5",
                                                        "text": "text", "label": "rating",
                                                        "classes": ["1.0", "5.0"]},
    "codeparrot/github-code": {"hf": "codeparrot/github-code", "text": "code", "label": "language",
                               "classes": ["C", "Python", "HTML", "Java", "PHP"], "one_split": True,
                               "skip_chars": 150, "min_chars": 128 * 3 + 150},
    "fancyzhx/ag_news": {"hf": "fancyzhx/ag_news", "text": "text", "label": "label",
                         "classes": ["0", "1", "2", "3"]},
    "Helsinki-NLP/europarl": {"hf": "Helsinki-NLP/europarl", "europarl": True, "one_split": True,
                              "classes": ["en", "fr", "de", "es", "nl"]},
}
EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
SHUFFLE_BUFFER = 10_000


def _label_str(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _stream(hf_name: str, split: str, seed: int, config: str | None = None):
    try:
        import datasets
    except ImportError as exc:
        raise MsaeError("SAEBench's probing datasets need the `datasets` package: pip install datasets") from exc
    args = (hf_name,) if config is None else (hf_name, config)
    try:
        ds = datasets.load_dataset(*args, split=split, streaming=True)
    except Exception as first:  # noqa: BLE001 - script datasets: try the Hub's parquet conversion
        try:
            ds = datasets.load_dataset(*args, split=split, streaming=True, revision="refs/convert/parquet")
        except Exception:  # noqa: BLE001 - report the first error, the one about the dataset itself
            line = (str(first).strip().splitlines() or [""])[0]
            raise MsaeError(f"cannot stream {hf_name} ({split}): {type(first).__name__}: {line}") from first
    return ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)


def _collect(rows, spec: dict, quotas: dict[tuple[str, str], int]) -> dict[tuple[str, str], list[str]]:
    """Fill (class, balance group) quotas from a row stream; stops as soon as all are full."""
    got: dict[tuple[str, str], list[str]] = {q: [] for q in quotas}
    left = sum(quotas.values())
    for row in rows:
        cls = _label_str(row[spec["label"]])
        group = _label_str(row[spec["balance"]]) if "balance" in spec else ""
        key = (cls, group)
        if key not in quotas or len(got[key]) >= quotas[key]:
            continue
        text = str(row[spec["text"]])
        if len(text) <= spec.get("min_chars", MIN_CHARS):
            continue
        text = text[spec.get("skip_chars", 0):]
        got[key].append(text)
        left -= 1
        if left == 0:
            break
    return got


def _saebench(name: str, n_train: int, n_test: int, seed: int) -> ProbeDataset:
    from msae_core.data.lm import hub_reachable

    spec = SAEBENCH[name]
    tr, te = _per_class(name, n_train, n_test)
    if not hub_reachable():
        raise MsaeError(f"{name} is streamed from the Hugging Face Hub, which is unreachable here; "
                        f"offline datasets: {', '.join(OFFLINE)}")
    classes = list(spec["classes"])
    pools: dict[str, dict[str, list[str]]] = {"train": {c: [] for c in classes}, "test": {c: [] for c in classes}}
    if spec.get("europarl"):
        # SAEBench reads each language from one language pair's train split, then splits it
        for lang in classes:
            rows = _stream(spec["hf"], "train", seed, EUROPARL_PAIRS[lang])
            texts = []
            for row in rows:
                t = str(row["translation"][lang])
                if len(t) > MIN_CHARS:
                    texts.append(t)
                if len(texts) >= tr + te:
                    break
            pools["train"][lang], pools["test"][lang] = texts[:tr], texts[tr:tr + te]
    elif spec.get("one_split"):
        got = _collect(_stream(spec["hf"], "train", seed), spec, {(c, ""): tr + te for c in classes})
        for c in classes:
            pools["train"][c], pools["test"][c] = got[(c, "")][:tr], got[(c, "")][tr:]
    else:
        for split, n in (("train", tr), ("test", te)):
            if "balance" in spec:
                # SAEBench: a quarter of the task per (class, group), e.g. profession x gender
                groups = ["0", "1"] if spec["balance"] == "gender" else ["1.0", "5.0"]
                got = _collect(_stream(spec["hf"], split, seed), spec,
                               {(c, g): n // 2 for c in classes for g in groups})
                for c in classes:
                    pools[split][c] = [t for g in groups for t in got[(c, g)]]
            else:
                got = _collect(_stream(spec["hf"], split, seed), spec, {(c, ""): n for c in classes})
                for c in classes:
                    pools[split][c] = got[(c, "")]
    # balanced by a second column, a class holds 2 * (n // 2) texts (SAEBench's quadrants)
    want_tr, want_te = (2 * (tr // 2), 2 * (te // 2)) if "balance" in spec else (tr, te)
    if want_tr < 1 or want_te < 1:
        raise MsaeError(f"{name}: probe_train_set_size and probe_test_set_size must be at least 4 "
                        "(a quarter per class and balancing group)")
    for c in classes:
        have_tr, have_te = len(pools["train"][c]), len(pools["test"][c])
        if have_tr < want_tr or have_te < want_te:
            raise MsaeError(f"{name}: class {c!r} gave {have_tr} train / {have_te} test texts, fewer than "
                            f"the {want_tr} / {want_te} asked for; lower "
                            "probe_train_set_size/probe_test_set_size")
    rng_train, rng_test = _rng(seed, name, "train"), _rng(seed, name, "test")
    train = [(t, c) for c in classes for t in pools["train"][c]]
    test = [(t, c) for c in classes for t in pools["test"][c]]
    rng_train.shuffle(train)
    rng_test.shuffle(test)
    prov = {"source": "Hugging Face datasets (streamed)", "dataset": spec["hf"], "saebench_name": name,
            "classes": classes, "balanced_by": spec.get("balance"), "shuffle_buffer": SHUFFLE_BUFFER,
            "seed": seed, "train_per_class": want_tr, "test_per_class": want_te,
            "note": "SAEBench samples whole splits with pandas; we take the first rows of a seeded "
                    "shuffled stream"}
    return ProbeDataset(name, prov, tuple(classes), train, test)


# ----------------------------------------------------------------------------------------------
# public API


def list_datasets(offline: bool | None = None) -> list[str]:
    """Dataset names. offline=True: the offline suite; False: SAEBench's (Hugging Face) datasets;
    None: the offline suite, plus SAEBench's when the Hugging Face Hub is reachable."""
    if offline is True:
        return list(OFFLINE)
    if offline is False:
        return list(SAEBENCH)
    from msae_core.data.lm import hub_reachable

    return list(OFFLINE) + (list(SAEBENCH) if hub_reachable() else [])


def load_probe_dataset(name: str, n_train: int, n_test: int, seed: int = 42) -> ProbeDataset:
    """Balanced train/test splits of dataset `name`: `n_train // 2` train and `n_test // 2` test
    texts per class (SAEBench's probe_train_set_size / probe_test_set_size), deterministic per seed."""
    if name in OFFLINE:
        return OFFLINE[name](n_train, n_test, seed)
    if name in SAEBENCH:
        return _saebench(name, n_train, n_test, seed)
    raise MsaeError(f"unknown probing dataset {name!r}; offline: {', '.join(OFFLINE)}; "
                    f"SAEBench's (need the Hugging Face Hub): {', '.join(SAEBENCH)}")
