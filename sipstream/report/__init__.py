"""`sipstream report RUN_DIR`: plots and one HTML page for a finished run.

`write_report(run_dir)` reads what `sipstream run` archived (sip.pairs, sip.weights, sip.metrics,
sip.deadletter under export/, summary.json, config) and any eval.json under RUN_DIR/eval/, and writes
RUN_DIR/report/index.html with PNGs beside it. The `plot_*` functions take plain data, so experiment
code can draw the same figures from its own numbers; `inputs` turns a run's records into that data.
"""

from sipstream.report.build import write_report
from sipstream.report.plots import (
    plot_curriculum,
    plot_eval_over_versions,
    plot_learner,
    plot_reward,
)

__all__ = ["plot_curriculum", "plot_eval_over_versions", "plot_learner", "plot_reward", "write_report"]
