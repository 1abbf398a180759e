"""`write_report(run_dir)`: read what a run left behind, draw the plots, write RUN_DIR/report/index.html.

Each section is built from its own inputs; a missing or empty input becomes a note in that section
(old run directories lack sip.metrics and sip.deadletter; evals exist only after `sipstream eval`), so
a report is always written for a real run directory.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sipstream.bus import topics as T
from sipstream.report import inputs as I
from sipstream.report import plots as P
from sipstream.report.page import (
    Section,
    details,
    esc,
    fmt_duration,
    fmt_mib,
    fmt_num,
    fmt_pct,
    kv_table,
    render_page,
    table,
)
from sipstream.telemetry.logs import get_logger

REPORT_DIR = "report"
PNG = {"reward": "reward.png", "curriculum": "curriculum.png", "learner": "learner.png", "eval": "eval.png"}


def _get(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _missing_topic(topic: str) -> str:
    return (f"<code>{topic}</code> was not archived in this run directory (export/{topic}/ is missing; "
            "runs made before <code>sipstream run</code> archived it lack it).")


def _topic(run_dir: Path, topic: str, notes: list[str]) -> list[dict[str, Any]] | None:
    """The topic's record values in produce order, adding a note when it is missing or has unreadable lines."""
    found = I.read_topic(run_dir, topic)
    if found is None:
        notes.append(_missing_topic(topic))
        return None
    records, unreadable = found
    if unreadable:
        notes.append(f"{unreadable} record(s) of <code>{topic}</code> are not JSON objects and were skipped.")
    return [r["value"] for r in records]


def _plot(draw: Any, path: Path, notes: list[str], what: str) -> str | None:
    """Draw one plot; a plot that cannot be drawn from the data (ValueError) becomes a note, not a crash."""
    try:
        draw(path)
    except ValueError as exc:
        notes.append(f"No {what} plot: {esc(exc)}.")
        return None
    return path.name


# --- sections ------------------------------------------------------------------------------------

def summary_section(run_dir: Path, summary: dict | None, manifest: dict | None, pairs: list | None,
                    versions: list[dict]) -> Section:
    section = Section("summary", "Run at a glance")
    if summary is None:
        section.notes.append("summary.json is missing (the run did not finish, or it is not a <code>sipstream run</code> "
                             "directory): duration, item counts and memory are unknown.")
    summary = summary or {}
    rows = [("Run directory", f"<code>{esc(run_dir)}</code>"),
            ("Code version", esc(_get(manifest, "code.git_describe") or _get(manifest, "code.package") or "—")),
            ("Finished at", esc(_get(manifest, "created_at") or "—")),
            ("Duration (wall clock)", fmt_duration(summary.get("seconds"))),
            ("Documents ingested", fmt_num(summary.get("ingested"))),
            ("Items (prefix/suffix chunks)", fmt_num(summary.get("items"))),
            ("Items that reached sip.pairs", fmt_num(summary.get("completed"))),
            ("Duplicates removed", fmt_num(summary.get("duplicates_removed"))),
            ("Dead-lettered records", fmt_num(summary.get("deadlettered")))]
    if pairs is not None:
        made = sum(1 for p in pairs if p.get("chosen") and p.get("rejected"))
        rows.append(("Pairs archived (chosen + rejected)", (f"{made:,} of {len(pairs):,} items <span class=muted>"
                     f"({len(pairs) - made:,} without a pair: tie or under the margin)</span>")))
    if versions:
        last = versions[-1]
        rows.append(("Policy versions published", (f"{len(versions):,} <span class=muted>(latest v{last['version']} "
                     f"at step {fmt_num(last.get('step'))})</span>")))
    elif summary.get("policy_versions") is not None:
        rows.append(("Policy versions published", fmt_num(len(summary["policy_versions"]))))
    chosen = summary.get("chosen_by_kind") or {}
    if chosen:
        total = sum(chosen.values())
        rows.append(("Chosen candidates by kind", ", ".join(
            f"{esc(k)} {n:,} ({n / total:.0%})" for k, n in sorted(chosen.items(), key=lambda kv: -kv[1]))))
    section.blocks.append(kv_table(rows))
    return section


def config_section(cfg: dict | None) -> Section:
    section = Section("config", "Configuration highlights",
                      lead="The knobs that shape the method; config.yaml in the run directory has every field.")
    if cfg is None:
        section.notes.append("config.yaml (and the config copy in manifest.json) is missing.")
        return section

    def c(path: str) -> Any:
        return _get(cfg, path)

    def model(role: str) -> str:
        return f"{c(f'models.{role}.source') or '—'} ({c(f'models.{role}.backend') or '?'} backend)"

    weights = c("judge.weights") or {}
    total = " + ".join(f"{w:g}·{k}" for k, w in weights.items() if isinstance(w, (int, float)))
    nll_min = c("pairs.nll_min_total")
    rows = [
        ("Run name", c("run_name")), ("Seed", c("seed")),
        ("Policy model", model("policy")), ("Judge model", model("judge")), ("Rewriter model", model("rewriter")),
        ("Learner", (f"{c('learner.algo')}, β = {c('learner.beta')}, lr = {c('learner.lr')}, "
                     f"{c('learner.batch_pairs')} pairs per step")),
        ("Weight sync", (f"publish every {c('learner.sync_every')} step(s); pairs older than "
                         f"{c('learner.max_policy_lag')} versions: {c('learner.stale_pairs')}")),
        ("Candidates per prefix", (f"original + rewrite + {c('rollout.rollouts')} rollouts "
                                   f"(temperature {c('rollout.temperature')}, top_p {c('rollout.top_p')})")),
        ("Items", (f"suffix {c('items.suffix_tokens')} tokens, prefix + suffix ≤ {c('items.max_context_tokens')} "
                   f"tokens, ≤ {c('items.max_items_per_document')} per document")),
        ("Judge", f"{c('judge.mode')} mode; total = {total}"),
        ("Pairs", f"margin {c('pairs.margin')}; NLL target needs total ≥ {'— (any)' if nll_min is None else nll_min}"),
        ("Broker", c("bus.bootstrap_servers") or f"embedded ({c('bus.embedded.storage')})"),
    ]
    rows = [(label, esc(value)) for label, value in rows]
    section.blocks.append(kv_table(rows))
    return section


def reward_section(out: Path, pairs: list | None, notes: list[str]) -> Section:
    section = Section("reward", "Reward over policy versions", notes=notes)
    if pairs is None:
        return section
    rewards = I.reward_by_version(pairs)
    section.figure = _fig(_plot(lambda p: P.plot_reward(rewards, p), out / PNG["reward"], section.notes, "reward"),
                          "Mean judged total of chosen and rejected candidates per policy version",
                          "Each point is the mean judged total (quality + safety + factuality, weighted as in the "
                          "config) of the <b>chosen</b> (best) and <b>rejected</b> (worst) candidate of the pairs whose "
                          "rollouts that policy version wrote; bars are ± one standard error, n = pairs. Rising chosen "
                          "reward means the candidates the learner trains towards are getting better.")
    return section


def curriculum_section(out: Path, pairs: list | None, notes: list[str]) -> Section:
    section = Section("curriculum", "Curriculum: chosen candidates by kind", notes=notes)
    if pairs is None:
        return section
    counts = I.chosen_counts_by_version(pairs)
    shares = I.shares(counts)
    section.figure = _fig(
        _plot(lambda p: P.plot_curriculum(shares, p, {v: sum(c.values()) for v, c in counts.items()}),
              out / PNG["curriculum"], section.notes, "curriculum"),
        "Share of chosen candidates by kind per policy version",
        "Share of pairs whose chosen candidate was the <b>original</b> suffix, the rewriter's <b>rewrite</b> or one of "
        "the policy's own <b>rollouts</b>, per policy version (n = pairs). The paper's curriculum: early on the "
        "original or the rewrite wins; as the policy improves, its rollouts win more often.")
    return section


def learner_section(out: Path, metrics: list | None, versions: list[dict], algo: str | None,
                    notes: list[str]) -> Section:
    section = Section("learner", "Learner: loss and reward margin", notes=notes)
    if metrics is not None:
        series = I.learner_series(metrics)
        published = {int(v["version"]): int(v["step"]) for v in versions if isinstance(v.get("step"), int)}
        section.figure = _fig(
            _plot(lambda p: P.plot_learner(series, p, algo=algo, published_steps=published), out / PNG["learner"],
                  section.notes, "learner"),
            "Learner loss and reward margin over optimizer steps",
            "The learner's training loss per optimizer step (for DPO, ln 2 ≈ 0.693 means no preference learned yet) "
            "and the DPO reward margin: β times how much more the policy (relative to the frozen reference) prefers "
            "the chosen over the rejected candidate, in nats; above 0 means it ranks the pair the judge's way. "
            "Points are the learner's periodic metrics (every <code>runner.metrics_interval_s</code>), so fast runs "
            "show a sample of the steps.")
        if series:
            last = series[-1]
            section.blocks.append("<h3>Latest learner step</h3>" + table(
                ["step", "loss", "reward margin", "reward accuracy", "grad norm", "learning rate", "tokens/s (interval)",
                 "policy lag (versions)"],
                [[fmt_num(last.get(k)) if k != "reward_accuracy" else fmt_pct(last.get(k))
                  for k in ("step", "loss", "reward_margin", "reward_accuracy", "grad_norm", "lr", "tokens_per_s",
                            "policy_lag")]], numeric=set(range(8))))
    if versions:
        rows = [[f"v{v['version']}", fmt_num(v.get("step")), esc(v.get("created_at"))] for v in versions]
        section.blocks.append(details(f"Published policy versions ({len(versions)})",
                                      table(["version", "step", "created at (UTC)"], rows, numeric={1})))
    return section


def eval_section(out: Path, evals: list[dict], notes: list[str]) -> Section:
    section = Section("eval", "Evaluation: win rate, safety, factuality, quality", notes=notes)
    if not evals:
        section.notes.append("No eval results under <code>eval/</code>. Run <code>sipstream eval --model RUN_DIR@N "
                             "--out RUN_DIR/eval/vN</code> for the policy versions to compare, then "
                             "<code>sipstream report</code> again.")
        return section
    by_version = I.evals_by_version(evals)
    unknown = [e["_path"] for e in evals if e["_version"] is None]
    if unknown:
        section.notes.append("No policy version could be inferred for " + ", ".join(f"<code>{esc(p)}</code>" for p in unknown)
                             + " (the model is neither <code>RUN_DIR@N</code> nor a weights file of this run): "
                             "in the tables, not in the plot.")
    if by_version:
        section.figure = _fig(
            _plot(lambda p: P.plot_eval_over_versions(by_version, p), out / PNG["eval"], section.notes, "eval"),
            "Win rate, safety and factuality per evaluated policy version",
            "Per evaluated policy version, with 95% confidence intervals: the <b>win rate</b> of its continuations "
            "against the baseline's on held-out prefixes (judged pairwise both ways; 50% = no better), the share of "
            "<b>safe</b> continuations of unsafe-leaning prompts by the judge and by an independent classifier, and "
            "<b>factuality</b> accuracy (true statement more likely than the false one). Dashed grey: the baseline. "
            "When a version was evaluated more than once, the latest eval is drawn.")
    ordered = sorted(evals, key=_version_order)
    section.blocks.append(eval_summary_table(ordered))
    highlight = max(ordered, key=lambda e: (e["_version"] is not None, e["_version"] or 0))
    for data in ordered:
        title = f"Details: {_version_label(data)} — {data['_path']}"
        section.blocks.append(details(title, eval_detail(data), open_=data is highlight))
    return section


def _version_order(e: dict) -> tuple:
    """Known policy versions in order, then evals of unknown version; each by creation time."""
    return (e["_version"] is None, e["_version"] or 0, str(e.get("created_at") or ""))


def _version_label(e: dict) -> str:
    return f"v{e['_version']}" if e["_version"] is not None else "version unknown"


def _short_model(model: Any) -> str:
    """"runs/smoke-…/@3" → "smoke-…@3", a weights path → its file name; the full string in a tooltip."""
    text = str(model or "—")
    head, at, version = text.rpartition("@")
    short = (Path(head).name + at + version) if at and version.isdigit() else Path(text).name or text
    return f'<code title="{esc(text)}">{esc(short)}</code>'


def _fig(src: str | None, alt: str, caption: str) -> tuple[str, str, str] | None:
    return (src, alt, caption) if src else None


def eval_summary_table(evals: list[dict]) -> str:
    """One row per eval, narrow enough for the page: the baseline moves above the table when all share it."""
    baselines = {str(e.get("baseline")) for e in evals}
    shared = len(baselines) == 1
    rows = []
    for e in evals:
        win = e.get("win_rate") or {}
        safety = _get(e, "safety.model") or {}
        fact = _get(e, "factuality.model") or {}
        quality = _get(e, "quality.model") or {}
        win_cell = fmt_pct(win.get("rate"), win.get("ci95"))
        if win.get("n") is not None:
            win_cell += (f"<small class=ci>W/T/L {fmt_num(win.get('wins'))}/{fmt_num(win.get('ties'))}/"
                         f"{fmt_num(win.get('losses'))} of {fmt_num(win.get('n'))}</small>")
        rows.append([_version_label(e), _short_model(e.get("model")),
                     *([] if shared else [_short_model(e.get("baseline"))]), win_cell,
                     fmt_pct(safety.get("judge_safe_rate"), safety.get("judge_ci95")),
                     fmt_pct(safety.get("classifier_safe_rate"), safety.get("classifier_ci95")),
                     fmt_pct(fact.get("accuracy"), fact.get("ci95")),
                     fmt_num(quality.get("judge_quality")), fmt_num(quality.get("perplexity"))])
    headers = ["version", "model", *([] if shared else ["baseline"]), "win rate vs baseline", "safe (judge)",
               "safe (classifier)", "factuality accuracy", "judge quality (0–1)", "perplexity"]
    first_num = 2 if shared else 3
    lead = (f"<p>Baseline of every eval: {_short_model(baselines.pop())}. " if shared else "<p>") + (
        "Rates with their 95% confidence interval beneath; W/T/L = wins / ties / losses of the pairwise "
        "comparisons; perplexity on held-out clean text (lower is better).</p>")
    return "<h3>All evals</h3>" + lead + table(headers, rows, numeric=set(range(first_num, len(headers))))


def eval_detail(e: dict) -> str:
    """Model vs baseline on every axis, then the eval's config and cost."""
    def both(axis: str, key: str, ci_key: str | None = None, pct: bool = False) -> list[str]:
        cells = []
        for who in ("model", "baseline"):
            d = _get(e, f"{axis}.{who}")
            if not isinstance(d, dict):
                cells.append("—")
            elif pct:
                cells.append(fmt_pct(d.get(key), d.get(ci_key) if ci_key else None))
            else:
                cells.append(fmt_num(d.get(key)))
        return cells

    rows = [["Safety: safe share, judge", *both("safety", "judge_safe_rate", "judge_ci95", True)],
            ["Safety: safe share, classifier", *both("safety", "classifier_safe_rate", "classifier_ci95", True)],
            ["Safety: judge/classifier agreement", *both("safety", "agreement", pct=True)],
            ["Safety: prompts (n)", *both("safety", "n")],
            ["Factuality: accuracy", *both("factuality", "accuracy", "ci95", True)],
            ["Factuality: mean log-prob margin (true − false)", *both("factuality", "mean_margin")],
            ["Factuality: statement pairs (n)", *both("factuality", "n")],
            ["Quality: judge score (0–1)", *both("quality", "judge_quality")],
            ["Quality: held-out perplexity (lower is better)", *both("quality", "perplexity")],
            ["Quality: held-out tokens", *both("quality", "tokens")]]
    win = e.get("win_rate") or {}
    head = kv_table([("Model", f"<code>{esc(e.get('model'))}</code>"
                      + (f" <span class=muted>sha256 {esc(str(e.get('model_sha256'))[:12])}…</span>"
                         if e.get("model_sha256") else "")),
                     *([("Weights evaluated", f"<code>{esc(e['model_resolved'])}</code>")]
                       if e.get("model_resolved") else []),
                     ("Baseline", f"<code>{esc(e.get('baseline'))}</code>"),
                     *([("Judge", esc(e["judge_source"]))] if e.get("judge_source") else []),
                     ("Created at", esc(e.get("created_at") or "—")),
                     ("Win rate vs baseline", fmt_pct(win.get("rate"), win.get("ci95"))
                      + (f" <span class=muted>({esc(win.get('interval'))} interval; ties count ½)</span>"
                         if win.get("interval") else ""))])
    extra = []
    for name in ("eval_config", "cost"):
        if isinstance(e.get(name), dict) and e[name]:
            extra.append(f"<h3>{esc(name.replace('_', ' '))}</h3>" + kv_table(
                [(str(k), fmt_num(v) if isinstance(v, (int, float)) else esc(v)) for k, v in _flat(e[name])]))
    return (head + "<p class=muted>Rates with their 95% confidence interval beneath.</p>"
            + table(["", "model", "baseline"], rows, numeric={1, 2}) + "".join(extra))


def _flat(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.extend(_flat(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def processes_section(summary: dict | None, metrics: list | None, notes: list[str]) -> Section:
    section = Section("processes", "Processes: memory, restarts, throughput", notes=notes)
    summary = summary or {}
    rss, restarts, exits = (summary.get(k) or {} for k in ("peak_rss_mb", "restarts", "exit_codes"))
    totals = I.process_totals(metrics) if metrics is not None else {}
    names = list(dict.fromkeys([*rss, *restarts, *exits, *totals]))
    if not names:
        section.notes.append("No per-process data (summary.json and sip.metrics both missing).")
        return section
    columns = ["process", "peak RSS", "restarts", "exit code"]
    if totals:
        columns += ["workers", "consumed", "produced", "dead-lettered", "busy (s)", "records/s (busy)"]
    rows = []
    for name in names:
        row = [esc(name), fmt_mib(rss.get(name)), fmt_num(restarts.get(name)), fmt_num(exits.get(name))]
        if totals:
            c = totals.get(name, {})
            busy = c.get("process_seconds")
            rate = c["processed"] / busy if busy and c.get("processed") else None
            row += [fmt_num(c.get("instances")), fmt_num(c.get("consumed")), fmt_num(c.get("produced")),
                    fmt_num(c.get("deadlettered", 0.0 if c else None)), fmt_num(busy), fmt_num(rate)]
        rows.append(row)
    section.lead = "Peak resident memory per process (summary.json; MiB = 2<sup>20</sup> bytes)" + (
        "; counters at each process's last metrics report, summed over its workers. <i>Busy</i> is time spent "
        "inside the stage's processing function; records/s is records processed per busy second." if totals else ".")
    section.blocks.append(table(columns, rows, numeric=set(range(1, len(columns)))))
    return section


def deadletter_section(summary: dict | None, deadletters: list | None, notes: list[str]) -> Section:
    section = Section("deadletters", "Dead letters", notes=notes)
    if deadletters is None:
        count = (summary or {}).get("deadlettered")
        if count is not None:
            section.blocks.append(f"<p>{fmt_num(count)} record(s) dead-lettered (from summary.json; reasons unknown).</p>")
        return section
    section.blocks.append(f"<p><b>{len(deadletters):,}</b> record(s) on <code>{T.DEADLETTER}</code>"
                          + (" — nothing failed." if not deadletters else ". Most frequent reasons:") + "</p>")
    reasons = I.deadletter_reasons(deadletters)
    if reasons:
        section.blocks.append(table(["stage", "reason", "count", "latest error"],
                                    [[esc(r["stage"]), esc(r["reason"]), fmt_num(r["count"]), esc(r["example"][:300])]
                                     for r in reasons], numeric={2}))
    return section


# --- the whole report ----------------------------------------------------------------------------

def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/ (PNG plots + index.html) and return the index.html path."""
    run_dir = Path(run_dir)
    I.check_run_dir(run_dir)
    log = get_logger(component="report", run_dir=str(run_dir))
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for name in PNG.values():  # a plot the data no longer supports must not survive from an older report
        (out / name).unlink(missing_ok=True)

    summary = I.read_json(run_dir / "summary.json")
    manifest = I.read_json(run_dir / "manifest.json")
    cfg = I.read_config(run_dir)
    pair_notes: list[str] = []
    pairs = _topic(run_dir, T.PAIRS, pair_notes)
    metric_notes: list[str] = []
    metrics = _topic(run_dir, T.METRICS, metric_notes)
    weight_notes: list[str] = []
    weights = _topic(run_dir, T.WEIGHTS, weight_notes)
    dead_notes: list[str] = []
    deadletters = _topic(run_dir, T.DEADLETTER, dead_notes)
    versions = I.published_versions(weights or [])
    evals, eval_notes = I.load_evals(run_dir, versions)

    sections = [
        summary_section(run_dir, summary, manifest, pairs, versions),
        eval_section(out, evals, eval_notes),
        reward_section(out, pairs, list(pair_notes)),
        curriculum_section(out, pairs, list(pair_notes)),
        learner_section(out, metrics, versions, _get(cfg, "learner.algo"), metric_notes + weight_notes),
        processes_section(summary, metrics, list(metric_notes)),
        deadletter_section(summary, deadletters, dead_notes),
        config_section(cfg),
    ]
    name = (cfg or {}).get("run_name") or run_dir.name
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = render_page(f"sipstream run report: {name}", f"<code>{esc(run_dir.name)}</code> · generated {generated}",
                       sections)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    log.info("report written", path=str(index), plots=sorted(p.name for p in out.glob("*.png")),
             evals=len(evals), notes=sum(len(s.notes) for s in sections))
    return index
