"""`sipstream run` end to end: embedded broker, topics, worker processes, the shipped corpus."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_sipstream_run_moves_the_corpus_through_every_stage(tmp_path) -> None:  # noqa: ANN001
    from sipstream.data import load_corpus

    result = subprocess.run([sys.executable, "-m", "sipstream", "run"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SIPSTREAM_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    n = len(load_corpus())
    assert f"ingested {n} documents" in result.stdout
    assert f"done: {n}/{n} documents reached" in result.stdout
    assert "0 dead-lettered" in result.stdout
