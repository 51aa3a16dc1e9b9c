"""Corpora (Debian fortunes, local files, HF datasets offline) and context windows."""

from __future__ import annotations

import json
import os

import pytest

from msae_core.data import lm as lm_mod
from msae_core.errors import MsaeError
from msae_core.data.text import Corpus, Document, WindowCursor, context_windows, load_corpus, load_fortunes


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    lm_mod.save_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture
def fake_fortunes(tmp_path, monkeypatch):
    (tmp_path / "cats").write_text("Cats sleep.\n%\nA cat\n  purrs.\n%\n%\n")
    (tmp_path / "dogs").write_text("Dogs bark.\n%\nDogs dig holes.")
    (tmp_path / "dogs.dat").write_bytes(b"\x00\x01")
    os.symlink("dogs", tmp_path / "dogs.u8")
    (tmp_path / "it").mkdir()
    (tmp_path / "it" / "gatti").write_text("Il gatto dorme.\n%\n")
    os.symlink("it/gatti", tmp_path / "gatti")  # Italian linked into the English folder
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_text("nope\n%\n")
    monkeypatch.setenv("MSAE_FORTUNES_DIR", str(tmp_path))
    return tmp_path


def test_fortunes_parsing_and_files(fake_fortunes):
    c = load_fortunes("en", shuffle_seed=None)
    docs = list(c.documents())
    assert [(d.doc_id, d.text, d.label) for d in docs] == [
        (0, "Cats sleep.", "cats"), (1, "A cat\n  purrs.", "cats"),
        (2, "Dogs bark.", "dogs"), (3, "Dogs dig holes.", "dogs")]
    assert [f["file"] for f in c.provenance["files"]] == ["cats", "dogs"]
    assert len(c.provenance["sha256"]) == 64 and c.name == "embedded"
    it = load_fortunes("it")
    assert [d.text for d in it.documents()] == ["Il gatto dorme."]
    assert load_fortunes("en", labels=["dogs"]).get(1).text == "Dogs dig holes."


def test_fortunes_shuffle_is_deterministic_and_ids_stable(fake_fortunes):
    a = [d.doc_id for d in load_fortunes("en", shuffle_seed=3).documents()]
    b = [d.doc_id for d in load_fortunes("en", shuffle_seed=3).documents()]
    assert a == b and sorted(a) == [0, 1, 2, 3]
    c = load_fortunes("en", shuffle_seed=3)
    assert all(c.get(d.doc_id) == d for d in c.documents())


def test_missing_fortunes_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("MSAE_FORTUNES_DIR", str(tmp_path / "none"))
    with pytest.raises(MsaeError, match="English.*apt-get install fortunes`$"):
        load_corpus("embedded")
    with pytest.raises(MsaeError, match="apt-get install fortunes-de"):
        load_fortunes("de")
    with pytest.raises(MsaeError, match="choose one of"):
        load_fortunes("xx")


@pytest.mark.skipif(not os.path.isfile("/usr/share/games/fortunes/cookie"), reason="fortunes not installed")
def test_real_english_fortunes():
    c = load_corpus("embedded")
    docs = list(c.documents())
    assert len(docs) > 10_000
    labels = {d.label for d in docs}
    assert {"computers", "cookie", "science"} <= labels
    assert "adams" not in labels  # an Italian file linked into the English folder
    assert not any(line.strip() == "%" for d in docs[:500] for line in d.text.splitlines())
    assert "fortunes" in c.provenance["packages"]
    assert c.provenance["packages"]["fortunes"] != "not installed"
    # shuffled: the first 300 documents already span many topics
    assert len({d.label for d in docs[:300]}) > 20


@pytest.mark.parametrize("lang", ["de", "es", "it"])
def test_real_other_language_fortunes(lang):
    if not os.path.isdir(f"/usr/share/games/fortunes/{lang}"):
        pytest.skip(f"fortunes-{lang} not installed")
    c = load_fortunes(lang)
    assert len(c) > 1000 and c.name == f"fortunes-{lang}"
    assert len({d.label for d in c.documents()}) >= 10


def _corpus(texts):
    docs = [Document(i, t, None) for i, t in enumerate(texts)]
    return Corpus("mem", {}, lambda: iter(docs), docs)


@pytest.mark.parametrize("separator", ["bos", "eos", "none"])
def test_packed_windows_follow_saebench(tok, separator):
    """Windows of BOS + the packed stream: documents joined by BOS (SAELens's default sequence
    separator, which SAEBench's evals read through), by EOS (stores harvested before the setting)
    or by nothing."""
    texts = [f"Document number {i} says: to be or not to be." * (1 + i % 3) for i in range(40)]
    kw = {} if separator == "bos" else {"separator": separator}  # bos is the default
    wins = list(context_windows(_corpus(texts), tok, context_size=16, **kw))
    assert len(wins) > 10
    assert all(len(w) == 16 and w[0] == tok.bos_token_id for _, w in wins)
    sep = {"bos": [tok.bos_token_id], "eos": [tok.eos_token_id], "none": []}[separator]
    if separator != "bos":
        assert all(tok.bos_token_id not in w[1:] for _, w in wins)
    # the window bodies are the joined token stream, in order, with the last partial dropped
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + sep
    bodies = [t for _, w in wins for t in w[1:]]
    assert bodies == stream[:len(bodies)] and len(stream) - len(bodies) < 15
    # doc_id is the document of each window's first token
    owner = []
    for i, t in enumerate(texts):
        n = len(tok(t, add_special_tokens=False)["input_ids"]) + len(sep)
        owner += [i] * n
    assert [d for d, _ in wins] == [owner[k * 15] for k in range(len(wins))]


@pytest.mark.parametrize("resume_context", [16, 9])
def test_a_cursor_resumes_the_packed_stream_without_its_prefix(tok, resume_context):
    """The windows after window n of a stream equal those a new stream started at its cursor gives
    (the same context size), and the cursor's stream tokenises none of the documents before it; at
    another context size it continues the same token stream from the same place."""
    texts = [f"Document {i}: " + "to be or not to be, " * (1 + i % 5) for i in range(60)]
    corpus = _corpus(texts)
    whole = context_windows(corpus, tok, context_size=16)
    first = [next(whole) for _ in range(23)]
    cursor = whole.cursor()
    assert WindowCursor.of(json.loads(json.dumps(cursor._asdict()))) == cursor  # json-safe, for checkpoints
    rest = list(whole)
    seen = []

    class Counting:  # the tokenizer, counting the documents it is given
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, texts, **kw):
            seen.extend(texts)
            return tok(texts, **kw)

    resumed = list(context_windows(corpus, Counting(), context_size=resume_context, start=cursor))
    assert seen and texts[cursor.docs - 1] not in seen and seen[0] == texts[cursor.docs]
    if resume_context == 16:
        assert resumed == rest
    # the body tokens continue the stream where window 23 ended, at any window size
    bodies = [t for _, w in first + rest for t in w[1:]]
    tail = [t for _, w in resumed for t in w[1:]]
    assert tail == bodies[len(first) * 15:len(first) * 15 + len(tail)] and len(tail) > 100


def test_pre_tokenised_documents_are_packed_as_they_are(tok, tmp_path):
    """A dataset of token ids (an `input_ids` column, read when there is no "text"): each row's ids
    are a document's tokens, packed as text documents are, never tokenised again."""
    rows = [list(range(3 + i, 3 + i + 5 + i)) for i in range(12)]
    p = tmp_path / "tokens.jsonl"
    p.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    corpus = load_corpus(str(p))
    assert [d.ids for d in corpus.documents()] == [tuple(r) for r in rows]
    wins = list(context_windows(corpus, tok, context_size=8))
    stream = [t for r in rows for t in r + [tok.bos_token_id]]
    assert [t for _, w in wins for t in w[1:]] == stream[:7 * len(wins)] and len(wins) == len(stream) // 7
    p.write_text(json.dumps({"input_ids": [1, -2]}) + "\n")
    with pytest.raises(MsaeError, match="not of token ids"):
        list(load_corpus(str(p)).documents())


def test_unpacked_windows_stay_in_their_document(tok):
    texts = ["short one", "a much longer document " * 10]
    wins = list(context_windows(_corpus(texts), tok, context_size=16, pack=False))
    assert wins[0] == (0, [tok.bos_token_id] + tok("short one", add_special_tokens=False)["input_ids"])
    assert all(d == 1 for d, _ in wins[1:]) and all(len(w) <= 16 and w[0] == tok.bos_token_id for _, w in wins)
    assert list(context_windows(_corpus(texts), tok, context_size=8, prepend_bos=False, pack=False))[0][1][0] != \
        tok.bos_token_id


def test_bad_context_size(tok):
    with pytest.raises(MsaeError, match="context size"):
        list(context_windows(_corpus(["x"]), tok, context_size=1))


def test_local_text_file_corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first doc\nstill first\n\nsecond doc\n\n\n")
    c = load_corpus(str(p))
    assert [d.text for d in c.documents()] == ["first doc\nstill first", "second doc"]
    assert len(c.provenance["sha256"]) == 64


def test_local_jsonl_through_datasets(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"body": f"text {i}", "y": i % 2}) + "\n" for i in range(5)))
    c = load_corpus(str(p), text_column="body", label_column="y")
    docs = list(c.documents())
    assert [d.text for d in docs] == [f"text {i}" for i in range(5)] and docs[1].label == "1"
    with pytest.raises(MsaeError, match="no text column"):
        list(load_corpus(str(p)).documents())


def test_hf_dataset_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(lm_mod, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(MsaeError, match="no network.*--corpus embedded"):
        load_corpus("nobody-xyz/no-such-dataset")
