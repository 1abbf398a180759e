"""`python -m sipstream.learner`: the learner as a process (also what torchrun launches).

    python -m sipstream.learner [--bootstrap HOST:PORT] [--config PATH] [--set section.field=value ...]

`--set learner.*` overrides apply to the learner's config even while `sipstream.config` still embeds
an older, smaller learner section. Without `--bootstrap`, `bus.bootstrap_servers` is used.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from sipstream.config import _parse_scalar, load_config
from sipstream.config.learner import LearnerConfig
from sipstream.errors import UserError
from sipstream.telemetry.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sipstream.learner", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: bus.bootstrap_servers)")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)



    learner_sets = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith("learner.")]
    others = [o for o in args.overrides if o not in learner_sets]
    try:
        cfg = load_config(args.config, others)
        data = cfg.learner.model_dump()
        for item in learner_sets:
            key, raw = item.split("=", 1)
            data[key.strip().removeprefix("learner.")] = _parse_scalar(raw)
        try:
            learner = LearnerConfig.model_validate(data)
        except ValidationError as err:
            raise UserError("invalid learner config: " + "; ".join(
                f"learner.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None
        bootstrap = args.bootstrap or cfg.bus.bootstrap_servers
        if not bootstrap:
            raise UserError("no broker: pass --bootstrap HOST:PORT or set bus.bootstrap_servers")
        configure_logging(cfg.logging)
        from sipstream.learner.loop import run_learner

        run_learner(cfg, bootstrap, learner=learner)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
