"""The echo stage: copies documents to `sip.echo`. Exercises the runner without any model."""

from __future__ import annotations

import time

from sipstream.bus import topics as T
from sipstream.bus.records import Document, Echo
from sipstream.bus.runner import Stage
from sipstream.config import Config


class EchoStage(Stage[Document, Echo]):
    name = "echo"
    input_topic = T.DOCUMENTS
    output_topic = T.ECHO

    def __init__(self, instance: str = "echo", delay_s: float = 0.0) -> None:
        self.instance = instance
        self.delay_s = delay_s

    def process(self, item: Document) -> list[Echo]:
        if self.delay_s:
            time.sleep(self.delay_s)  # stands in for model time in tests and demos
        echo: Echo = {**item, "echoed_by": self.instance}
        return [echo]


def build(cfg: Config) -> EchoStage:
    return EchoStage(delay_s=cfg.stages.echo.delay_s)
