"""`python -m sipstream.learner` (what torchrun launches): the `sipstream learner` command, same options
and config loader (`--config`, `--set`, `--bootstrap-servers/--bootstrap`, `--algo`, `--max-steps`, ...)."""

import sys

from sipstream.cli import main

if __name__ == "__main__":
    main(["learner", *sys.argv[1:]])
