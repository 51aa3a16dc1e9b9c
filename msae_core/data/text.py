"""Text corpora and fixed-length context windows.

"embedded" is Debian's English fortunes (`apt-get install fortunes`): ~2.6 MB of real English in
~50 topical files under /usr/share/games/fortunes, one document per `%`-separated fortune, labelled
with its topic file. `load_fortunes(lang)` also reads the German, Spanish and Italian collections
(packages fortunes-de, fortunes-es, fortunes-it), which the evals use as labelled probing data.
Any other name is a Hugging Face dataset, streamed; a local .txt file (documents separated by blank
lines) or .jsonl/.json/.parquet file also works.

Windows follow SAEBench / SAELens: documents are tokenised without special tokens, joined with a
separator (BOS, SAELens's default; EOS; none) into one stream, cut into pieces of `context_size - 1`
tokens and given a BOS each. The last incomplete piece is dropped. The harvest drops the BOS/EOS/PAD
rows by default. A pre-tokenised dataset (a column of token ids: `input_ids`, or `text_column`
naming one) gives its documents' ids as they are, packed the same way.

Where the packed stream stands after a window is a `WindowCursor` (the documents read, the tokens
not yet in a window): a stream resumed from a checkpoint, and the core eval holding out the windows
a run trained on, start there instead of tokenising the whole prefix again.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from msae_core.errors import MsaeError

EMBEDDED = "embedded"
FORTUNES_ROOT = Path("/usr/share/games/fortunes")
# language -> (subfolder, Debian packages holding it)
FORTUNE_LANGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "en": ("", ("fortunes", "fortunes-min")),
    "de": ("de", ("fortunes-de",)),
    "es": ("es", ("fortunes-es",)),
    "it": ("it", ("fortunes-it",)),
}


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str
    label: str | None = None
    ids: tuple[int, ...] | None = None  # a pre-tokenised document's token ids (text is then "")


@dataclass
class Corpus:
    """A named source of documents. `documents()` yields them in a fixed (deterministic) order;
    `doc_id` is a document's index in the corpus' canonical order, stable across calls."""

    name: str
    provenance: dict
    _iter: Callable[[], Iterator[Document]] = field(repr=False)
    _docs: list[Document] | None = field(default=None, repr=False)

    def documents(self) -> Iterator[Document]:
        return self._iter()

    def get(self, doc_id: int) -> Document | None:
        """One document by id (in-memory corpora only; None for streamed ones)."""
        if self._docs is None or not 0 <= doc_id < len(self._docs):
            return None
        return self._docs[doc_id]

    def __len__(self) -> int:
        if self._docs is None:
            raise TypeError(f"corpus {self.name} is streamed: its length is unknown")
        return len(self._docs)


# ----------------------------------------------------------------------------------------------
# Debian fortunes


def fortunes_root() -> Path:
    return Path(os.environ.get("MSAE_FORTUNES_DIR") or FORTUNES_ROOT)


def _fortune_files(lang: str, root: Path) -> list[Path]:
    sub, _ = FORTUNE_LANGS[lang]
    folder = root / sub if sub else root
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        # regular files only: the top folder links Italian files in (adams -> it/adams), *.u8 link
        # to their file; *.dat are strfile indexes; folders (off/, de/, ...) are skipped
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        out.append(p)
    return out


def _split_fortunes(data: str) -> list[str]:
    docs, cur = [], []
    for line in data.splitlines():
        if line.strip() == "%":
            docs.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line.rstrip())
    docs.append("\n".join(cur).strip())
    return [d for d in docs if d]


def _package_versions(packages: Iterable[str]) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                                 text=True, timeout=10)
            out[pkg] = res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "not installed"
        except (OSError, subprocess.SubprocessError):
            out[pkg] = "unknown (no dpkg-query)"
    return out


def load_fortunes(lang: str = "en", root: str | os.PathLike | None = None,
                  labels: Iterable[str] | None = None, shuffle_seed: int | None = 0) -> Corpus:
    """Debian fortunes of one language as a labelled corpus (label = topic file name).

    labels: keep only these topics. shuffle_seed: documents() yields the documents in an order
    shuffled by this seed (None: file order), so any prefix spans all topics; doc_id is always the
    index in file order."""
    if lang not in FORTUNE_LANGS:
        raise MsaeError(f"no fortunes for language {lang!r}: choose one of {', '.join(FORTUNE_LANGS)}")
    base = Path(root) if root is not None else fortunes_root()
    files = _fortune_files(lang, base)
    packages = FORTUNE_LANGS[lang][1]
    if not files:
        names = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian"}
        raise MsaeError(f"no {names[lang]} fortunes in {base}: install them with "
                        f"`sudo apt-get install {packages[0]}`")
    wanted = None if labels is None else set(labels)
    docs: list[Document] = []
    digest = hashlib.sha256()
    listing = []
    for p in files:
        raw = p.read_bytes()
        digest.update(raw)
        listing.append({"file": p.name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
        if wanted is not None and p.name not in wanted:
            continue
        for text in _split_fortunes(raw.decode("utf-8", errors="replace")):
            docs.append(Document(len(docs), text, p.name))
    if wanted is not None and not docs:
        raise MsaeError(f"no {lang} fortunes with labels {sorted(wanted)}: "
                        f"topics are {', '.join(x['file'] for x in listing)}")
    order = list(range(len(docs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    provenance = {
        "source": "Debian fortunes", "language": lang, "root": str(base / FORTUNE_LANGS[lang][0]),
        "packages": _package_versions(packages), "files": listing,
        "sha256": digest.hexdigest(), "n_documents": len(docs),
        "labels": sorted(wanted) if wanted is not None else None, "shuffle_seed": shuffle_seed,
        "split": "documents separated by lines holding only '%'",
    }
    name = EMBEDDED if lang == "en" and wanted is None else f"fortunes-{lang}"
    return Corpus(name, provenance, lambda: (docs[i] for i in order), docs)


# ----------------------------------------------------------------------------------------------
# local files and Hugging Face datasets


def _local_text_corpus(path: Path) -> Corpus:
    raw = path.read_bytes()
    texts = [t.strip() for t in raw.decode("utf-8", errors="replace").split("\n\n") if t.strip()]
    docs = [Document(i, t, None) for i, t in enumerate(texts)]
    prov = {"source": "local text file", "path": str(path.resolve()),
            "sha256": hashlib.sha256(raw).hexdigest(), "n_documents": len(docs),
            "split": "documents separated by blank lines"}
    return Corpus(str(path), prov, lambda: iter(docs), docs)


TOKENS_COLUMN = "input_ids"  # a pre-tokenised dataset's column, read when it has no "text" column


def _hf_corpus(name: str, split: str, text_column: str, config: str | None,
               label_column: str | None) -> Corpus:
    try:
        import datasets
    except ImportError as exc:
        raise MsaeError("Hugging Face corpora need the `datasets` package: pip install datasets") from exc
    from msae_core.data.lm import hub_reachable

    local = Path(name).expanduser()
    builder_kw: dict = {}
    if local.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
        if kind is None:
            raise MsaeError(f"cannot read corpus file {local}: use .txt, .jsonl, .json, .parquet or .csv")
        args: tuple = (kind,)
        builder_kw["data_files"] = str(local)
    elif local.is_dir():
        args = (str(local),)
    else:
        if not hub_reachable():
            raise MsaeError(f"cannot stream dataset {name!r}: there is no network to reach the Hugging "
                            "Face Hub; use --corpus embedded (Debian fortunes) or a local file")
        args = (name,) if config is None else (name, config)
    try:
        ds = datasets.load_dataset(*args, split=split, streaming=True, **builder_kw)
        features = getattr(ds, "features", None)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise MsaeError(f"cannot load dataset {name!r} (split {split!r}): {type(exc).__name__}: {first}") from exc
    if features is not None and text_column not in features:
        if text_column == "text" and TOKENS_COLUMN in features:  # pre-tokenised, as SAELens reads it
            text_column = TOKENS_COLUMN
        else:
            raise MsaeError(f"dataset {name!r} has no text column {text_column!r} "
                            f"(columns: {', '.join(features)}); choose one with text_column")

    def documents() -> Iterator[Document]:
        for i, row in enumerate(ds):
            if text_column not in row:
                raise MsaeError(f"dataset {name!r} has no text column {text_column!r} "
                                f"(columns: {', '.join(row)})")
            label = row.get(label_column) if label_column else None
            label = None if label is None else str(label)
            value = row[text_column]
            if isinstance(value, (list, tuple)):  # token ids: a pre-tokenised dataset
                if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
                    raise MsaeError(f"dataset {name!r}: column {text_column!r} of row {i} is a list but not "
                                    "of token ids (non-negative integers)")
                yield Document(i, "", label, tuple(value))
            else:
                yield Document(i, str(value), label)

    prov = {"source": "Hugging Face datasets (streamed)", "dataset": name, "config": config,
            "split": split, "text_column": text_column, "datasets_version": datasets.__version__}
    return Corpus(name, prov, documents)


def load_corpus(name: str = EMBEDDED, split: str = "train", text_column: str = "text",
                config: str | None = None, label_column: str | None = None) -> Corpus:
    """A corpus by name: "embedded" (English fortunes), "fortunes-de|es|it", a local .txt file, or a
    Hugging Face dataset name / local data file, streamed."""
    if name == EMBEDDED:
        return load_fortunes("en")
    if name.startswith("fortunes-") and name[len("fortunes-"):] in FORTUNE_LANGS:
        return load_fortunes(name[len("fortunes-"):])
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".txt":
        return _local_text_corpus(p)
    return _hf_corpus(name, split, text_column, config, label_column)


def corpus_of(settings: Any) -> Corpus:
    """The corpus a harvest, a stream or a store's manifest names: `corpus` with its Hugging Face
    config, split and text column (`corpus_config`, `corpus_split`, `text_column`; a manifest from
    before they were recorded means the defaults)."""
    get = settings.get if isinstance(settings, dict) else lambda k, d=None: getattr(settings, k, d)
    name = get("corpus", EMBEDDED)
    name = name.get("name", EMBEDDED) if isinstance(name, dict) else str(name)
    return load_corpus(name, split=str(get("corpus_split", "train") or "train"),
                       text_column=str(get("text_column", "text") or "text"),
                       config=str(get("corpus_config", "") or "") or None)


# ----------------------------------------------------------------------------------------------
# context windows


SEPARATORS = ("bos", "eos", "none")
# what a store harvested before stores recorded their separator was joined with
LEGACY_SEPARATOR = "eos"


def _separator(tokenizer, which: str = "bos") -> int | None:
    """The token id between packed documents: BOS (SAELens's default), EOS, or none; a tokenizer
    without the one asked for gives the other."""
    if which not in SEPARATORS:
        raise MsaeError(f"separator must be one of {', '.join(SEPARATORS)} (got {which!r})")
    if which == "none":
        return None
    order = ("bos_token_id", "eos_token_id") if which == "bos" else ("eos_token_id", "bos_token_id")
    for attr in order:
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return None


def _bos(tokenizer) -> int | None:
    v = getattr(tokenizer, "bos_token_id", None)
    if v is None:
        v = getattr(tokenizer, "eos_token_id", None)
    return None if v is None else int(v)


class WindowCursor(NamedTuple):
    """Where a packed window stream stands after a window: `docs` documents of the corpus read
    (in its order), `rest` the tokens read but not yet in a window (separators included), `owners`
    the [offset in rest, doc_id] of the documents `rest` holds, the first one's offset <= 0 when it
    began in an earlier window. Json-safe as `_asdict()`; `WindowCursor.of(dict)` reads it back."""

    docs: int
    rest: list
    owners: list

    @classmethod
    def of(cls, d: dict) -> "WindowCursor":
        return cls(int(d["docs"]), [int(t) for t in d["rest"]], [[int(a), int(b)] for a, b in d["owners"]])


class PackedWindows:
    """The iterator `context_windows` returns: (doc_id, token ids) windows, and `cursor()`, where
    the stream stands after the last window given (to start another PackedWindows there)."""

    def __init__(self, corpus: Corpus, tokenizer, context_size: int, prepend_bos: bool, pack: bool,
                 batch_docs: int, separator: str, start: WindowCursor | None):
        if context_size < 2:
            raise MsaeError(f"context size must be >= 2 (got {context_size})")
        bos = _bos(tokenizer) if prepend_bos else None
        if prepend_bos and bos is None:
            raise MsaeError("the tokenizer has no BOS (or EOS) token to prepend")
        if start is not None and not pack:
            raise ValueError("a cursor starts packed windows only")
        self.corpus, self.tokenizer, self.batch_docs = corpus, tokenizer, batch_docs
        self.sep = _separator(tokenizer, separator)
        self.body = context_size - (1 if prepend_bos else 0)
        self.head = [bos] if prepend_bos else []
        start = start or WindowCursor(0, [], [])
        self._docs, self._buf, self._owners = start.docs, list(start.rest), [list(o) for o in start.owners]
        self._gen = self._packed() if pack else self._per_document()

    def __iter__(self) -> "PackedWindows":
        return self

    def __next__(self) -> tuple[int, list[int]]:
        return next(self._gen)

    def cursor(self) -> WindowCursor:
        return WindowCursor(self._docs, list(self._buf), [list(o) for o in self._owners])

    def _tokenised(self) -> Iterator[tuple[int, list[int]]]:
        """(doc_id, ids) of the documents after the first `_docs`, which are read but not tokenised."""
        docs = itertools.islice(self.corpus.documents(), self._docs, None)
        while True:
            chunk = list(itertools.islice(docs, self.batch_docs))
            if not chunk:
                return
            texts = [d.text for d in chunk if d.ids is None]
            enc = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
            for d in chunk:
                yield d.doc_id, list(d.ids) if d.ids is not None else list(next(enc))

    def _per_document(self) -> Iterator[tuple[int, list[int]]]:
        for doc_id, ids in self._tokenised():
            self._docs += 1
            for start in range(0, len(ids), self.body):
                yield doc_id, self.head + ids[start:start + self.body]

    def _packed(self) -> Iterator[tuple[int, list[int]]]:
        body, buf = self.body, self._buf
        for doc_id, ids in self._tokenised():
            self._docs += 1
            if not ids:
                continue
            self._owners.append([len(buf), doc_id])
            buf.extend(ids)
            if self.sep is not None:
                buf.append(self.sep)
            while len(buf) >= body:
                window = buf[:body]
                # the document holding the window's first token
                owner = next((d for s, d in reversed(self._owners) if s <= 0), -1)
                del buf[:body]
                owners = [[s - body, d] for s, d in self._owners]
                # keep only the last owner starting at or before 0, and those after
                keep = [i for i, (s, _) in enumerate(owners) if s <= 0]
                self._owners = owners[keep[-1]:] if keep else owners
                yield owner, self.head + window


def context_windows(corpus: Corpus, tokenizer, context_size: int = 128, prepend_bos: bool = True,
                    pack: bool = True, batch_docs: int = 64, separator: str = "bos",
                    start: WindowCursor | None = None) -> PackedWindows:
    """(doc_id, token ids) windows of exactly `context_size` tokens, deterministically (an
    iterator, PackedWindows, whose `cursor()` says where it stands).

    pack=True (SAEBench, through SAELens's ActivationsStore): documents are joined by `separator`
    (BOS, SAELens's default sequence separator; "eos"; "none") and cut into windows; doc_id is the
    document of the window's first content token. pack=False: each document gives its own windows
    (the last one of a document may be shorter), e.g. for per-document probing. `start`: a cursor
    of an earlier stream of the same corpus and settings (any context size): the windows that
    follow it, without tokenising what came before."""
    return PackedWindows(corpus, tokenizer, context_size, prepend_bos, pack, batch_docs, separator, start)
