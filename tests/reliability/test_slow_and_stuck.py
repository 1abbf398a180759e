"""Slow and stuck model servers: the judge and the rewriter run on the `openai` backend against a real HTTP
server on 127.0.0.1 that misbehaves for chosen texts (sleeps past the client timeout, answers garbage that
is not JSON, answers HTTP 500, or stalls once and then recovers). Each bad item is retried a bounded number
of times with backoff, then dead-lettered with the reason; the good items around it, in the same partition,
still get through, and the stream never stalls. The committed offset moves past each poison record, so a restarted
worker does not meet it again."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sipstream.bus import topics as T
from sipstream.bus.runner import StageRunner
from sipstream.config.models import JudgeSpec, ModelSpec, RewriterSpec

TIMEOUT_S = 0.5
MAX_RETRIES = 1
# Verdict tokens of every judge question, so a well-behaved answer reads as a verdict in logit mode.
TOP_LOGPROBS = {" YES": -0.2, " Yes": -3.0, " NO": -1.8, " No": -4.0, " 1": -0.5, " 2": -1.0,
                " NONE": -0.3, " None": -3.0, " POSSIBLE": -1.6, " Possible": -4.0, " DEFINITE": -2.5, " Definite": -5.0}
# Marker in a text → how the server treats every request whose prompt holds it.
POISON = {"STALLMARK": "stall", "GARBAGEMARK": "garbage", "BROKENMARK": "http500"}
FLAKY = "FLAKYMARK"  # stalls on its first request only: a slow server that recovers within the retries


class _MisbehavingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        prompt = request.get("prompt", "")
        server = self.server
        behaviour = next((b for marker, b in POISON.items() if marker in prompt), "ok")
        with server.lock:
            server.requests[behaviour] += 1
            if behaviour != "ok":
                server.per_prompt[prompt] += 1
            if FLAKY in prompt and not server.flaky_stalled:
                server.flaky_stalled = True
                behaviour = "stall"
        try:
            if behaviour == "stall":
                time.sleep(TIMEOUT_S * 3)  # the client gives up first
                self._send(200, b"{}")
            elif behaviour == "garbage":
                self._send(200, b"<html>upstream crashed \xff\xfe")
            elif behaviour == "http500":
                self._send(500, b'{"error": {"message": "model crashed"}}')
            else:
                logprobs = {"tokens": [" YES"], "token_logprobs": [-0.2], "top_logprobs": [TOP_LOGPROBS],
                            "text_offset": [0]} if request.get("logprobs") else None
                body = {"choices": [{"index": 0, "text": " a calm and safe continuation", "logprobs": logprobs,
                                     "finish_reason": "length"}]}
                self._send(200, json.dumps(body).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up


@pytest.fixture
def misbehaving_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MisbehavingHandler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.requests = Counter()
    server.per_prompt = Counter()
    server.flaky_stalled = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _item(i: int, text: str) -> dict:
    """A record valid on sip.prefixes and sip.rollouts; one doc_id for all, so all share one partition."""
    return {"item_id": f"doc:{i}", "doc_id": "doc", "chunk_index": i, "prefix": f"Chapter {i}. The morning was",
            "suffix": f" {text} and the river ran on.", "seed": i, "rewrite": None, "why": [],
            "rollouts": [" the sun rose slowly."], "policy_version": 0}


def _build_stage(stage: str, base_url: str, model_cache):
    from sipstream.models import Judge, Rewriter
    from sipstream.models.openai_backend import OpenAIModel
    from sipstream.stages.judge import JudgeStage
    from sipstream.stages.rewrite import RewriteStage

    spec = ModelSpec(backend="openai", base_url=base_url, timeout_s=TIMEOUT_S, max_retries=MAX_RETRIES, backoff_s=0.05,
                     concurrency=2, tokenizer="tiny-gpt2", cache_dir=model_cache)
    model = OpenAIModel(spec)
    judge = Judge(model, JudgeSpec(weights={"factuality": 0.0}))
    if stage == "judge":
        return JudgeStage(judge), T.ROLLOUTS, T.JUDGED
    return RewriteStage(Rewriter(model, judge, RewriterSpec(rewrite_candidates=1))), T.PREFIXES, T.REWRITTEN


@pytest.mark.parametrize("stage", ["judge", "rewrite"])
def test_a_stuck_or_broken_model_server_dead_letters_the_item_and_the_stream_flows(
    stage, bus, misbehaving_server, tmp_path_factory, figures
) -> None:
    host, port = misbehaving_server.server_address[:2]
    processor, source, target = _build_stage(stage, f"http://{host}:{port}/v1", tmp_path_factory.mktemp("cache"))
    texts = ["good one", "STALLMARK", "good two", "GARBAGEMARK", "good three", "BROKENMARK", FLAKY, "good four"]
    items = [_item(i, text) for i, text in enumerate(texts)]
    bus.produce(source, items)  # in this order, in one partition: each poison record sits between good ones

    runner = StageRunner(processor, bus.cfg, bus.bootstrap)
    started = time.monotonic()
    runner.run(until=lambda s: s.counters["consumed"] >= len(items))
    elapsed = time.monotonic() - started

    out = {v["item_id"] for v in bus.values(target, expect=5)}
    dead = {json.loads(base64.b64decode(d["value_b64"]))["item_id"]: d for d in bus.values(T.DEADLETTER, expect=3)}
    poison_ids = {f"doc:{i}" for i, text in enumerate(texts) if text in POISON}
    assert out == {it["item_id"] for it in items} - poison_ids  # every good record (and the flaky one) got through
    assert set(dead) == poison_ids
    reasons = {texts[int(k.split(":")[1])]: d["reason"] for k, d in dead.items()}
    assert all(d["error"] == "process" and d["stage"] == stage for d in dead.values())
    assert "failed 2 times" in reasons["STALLMARK"] and "Timeout" in reasons["STALLMARK"]
    assert "not JSON" in reasons["GARBAGEMARK"]
    assert "HTTP 500" in reasons["BROKENMARK"]
    # Bounded: a poison prompt is tried 1 + max_retries times per attempt at its item (the batch, then the item
    # alone), never more; the whole batch took seconds, not an unbounded wait.
    per_poison = {b: misbehaving_server.requests[b] for b in POISON.values()}
    most_tries = max(misbehaving_server.per_prompt.values())
    assert all(n > 0 for n in per_poison.values()) and most_tries <= 2 * (1 + MAX_RETRIES), misbehaving_server.per_prompt
    assert elapsed < 60

    # The group's committed offset is past every poison record: a restarted worker starts after them. It reads
    # only a record produced after the restart and asks the server nothing about the poison prompts.
    positions = {json.loads(m.value())["item_id"]: (m.partition(), m.offset()) for m in bus.read(source, expect=len(items))}
    (partition,) = {p for p, _ in positions.values()}
    committed = _committed(bus, f"{bus.cfg.bus.group_prefix}.{stage}", bus.topic(source), partition)
    last_poison = max(o for item_id, (_, o) in positions.items() if texts[int(item_id.split(":")[1])] in POISON)
    assert committed == max(o for _, o in positions.values()) + 1 > last_poison
    poison_requests_before = sum(misbehaving_server.per_prompt.values())
    bus.produce(source, [_item(len(texts), "good after restart")])
    restarted = StageRunner(_build_stage(stage, f"http://{host}:{port}/v1", tmp_path_factory.mktemp("cache2"))[0],
                            bus.cfg, bus.bootstrap)
    restarted_at = time.monotonic()
    restart_stats = restarted.run(until=lambda s: s.counters["consumed"] >= 1 or time.monotonic() > restarted_at + 120)
    restart_s = time.monotonic() - restarted_at
    poison_requests_after = sum(misbehaving_server.per_prompt.values()) - poison_requests_before
    assert restart_stats.counters["consumed"] == restart_stats.counters["processed"] == 1
    assert poison_requests_after == 0

    figures(f"slow_and_stuck.{stage}", records_in=len(items), records_out=len(out), deadlettered=len(dead),
            poison_requests=per_poison, most_tries_of_one_prompt=most_tries, seconds=round(elapsed, 1),
            committed_offset=committed, last_poison_offset=last_poison,
            restart_consumed=restart_stats.counters["consumed"], poison_requests_after_restart=poison_requests_after,
            restart_to_first_record_s=round(restart_s, 1),
            reasons={k: v[:90] for k, v in reasons.items()})


def _committed(bus, group: str, topic: str, partition: int) -> int:
    """The offset `group` committed on one partition (read without joining the group)."""
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer({"bootstrap.servers": bus.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        (tp,) = probe.committed([TopicPartition(topic, partition)], timeout=10)
        return tp.offset
    finally:
        probe.close()
