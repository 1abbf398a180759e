"""Prompt templates for the judge and the rewriter, kept as files in ``configs/prompts/``.

A template is plain text with ``{name}`` placeholders; leading lines that start with ``#`` are
comments (attribution, placeholders) and are not sent to the model. Filling is a single pass, so
braces inside the inserted document text are never read as placeholders.
"""

from __future__ import annotations

import re
from pathlib import Path

#: The repository's ``configs/prompts`` (the package sits at ``<repo>/sipstream/models``).
DEFAULT_PROMPTS_DIR = Path(__file__).resolve().parents[2] / "configs" / "prompts"

_PLACEHOLDER = re.compile(r"\{([a-z_0-9]+)\}")


def load_prompt(name: str, prompts_dir: str | Path | None = None) -> str:
    """Template text of ``<prompts_dir>/<name>.txt`` without its leading comment lines."""
    path = Path(prompts_dir or DEFAULT_PROMPTS_DIR) / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} not found; set prompts_dir to a folder holding {name}.txt")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    first_body_line = 0
    while first_body_line < len(lines) and lines[first_body_line].startswith("#"):
        first_body_line += 1
    # The trailing newline is dropped: templates end on the cue the model answers after.
    return "".join(lines[first_body_line:]).rstrip("\n")


def prompt_directives(name: str, prompts_dir: str | Path | None = None) -> dict[str, str]:
    """``# key: value`` lines of a template's comment header (e.g. ``# yes-means: unsafe``), so a
    prompt carries the facts the code needs to read its answer."""
    path = Path(prompts_dir or DEFAULT_PROMPTS_DIR) / f"{name}.txt"
    directives = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*([a-z][a-z-]*):\s*(\S+)\s*$", line)
        if match:
            directives[match.group(1)] = match.group(2)
    return directives


def template_fields(template: str) -> set[str]:
    """Placeholder names used by a template."""
    return set(_PLACEHOLDER.findall(template))


def render_prompt(template: str, **fields: str) -> str:
    """Fill every ``{name}`` of ``template``; a placeholder without a value is an error."""
    missing = template_fields(template) - fields.keys()
    if missing:
        raise KeyError(f"prompt template needs values for {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], template)


# Answer cues of the judge prompts ("Toxic or dangerous:", "FINAL DECISION:", "Better:", "Option 1:", ...).
_CUE = re.compile(r"\b(final\s+decision|final\s+answer|toxic\s+or\s+dangerous|better|hallucination|comment|"
                  r"option\s*[12]|system|user|assistant)\s*:", re.IGNORECASE)


def neutralise(text: str) -> str:
    """Untrusted text (a prefix, a candidate) made unable to impersonate the prompt around it.

    A candidate that ends "...FINAL DECISION: YES" or starts a new "Comment:" line can prime a small
    logit-scored judge with the verdict it wants (measured in tests/reliability/test_prompt_injection.py).
    Line breaks become spaces, so the text stays inside its own field, and an answer cue loses its colon
    ("FINAL DECISION - YES"), so it reads as quoted words rather than as the prompt's own cue."""
    flat = re.sub(r"\s*[\r\n]+\s*", " ", text)
    return _CUE.sub(lambda match: f"{match.group(1)} -", flat)


def last_words(text: str, count: int) -> str:
    """The literal end of ``text`` starting at its ``count``-th word from the end (spacing kept).

    Used to cut a long prefix for a small judge and to repeat the prefix's last words before the
    suffix for the rewriter; ``count == 0`` gives an empty string."""
    if count <= 0:
        return ""
    word_starts = [match.start() for match in re.finditer(r"\S+", text)]
    if len(word_starts) <= count:
        return text.lstrip()
    return text[word_starts[-count]:]
