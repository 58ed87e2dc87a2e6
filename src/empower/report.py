"""Reports of saved evaluation runs: the paper's tables and figures, rebuilt from run folders on disk.

Everything comes from the run folders (``config.json`` + ``traces.jsonl``) through
:mod:`empower.metrics`, so a report can be regenerated at any time and never disagrees with the runs::

    empower report runs/demo --out runs/demo/report          # a reproduce folder (grid.json, calibration)
    empower report runs/eval/a runs/eval/b --out report       # any run folders
    build_report(["runs/demo"], "runs/demo/report")           # -> Path of report.md

Writes ``report.md``, ``report.html`` (the same content, figures embedded, one self-contained file)
and ``figures/*.png``: per task set, bar charts of Pass@1 / acceptance / DPR with 95% CIs (the paper's
Figure 2), the distribution of suggestion lengths per method, and the eta sweep of a calibration.

Folders given are searched recursively for run folders. A reproduce folder's ``grid.json`` names the
method, human and task set of each run; a ``calibration.json`` marks the runs of an eta sweep (they go
to the sweep section, not the main table). Runs without a grid entry are labelled from their config.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

from empower.configs import option
from empower.metrics import Estimate, Summary, compare_runs, run_episodes, summarize_run

# The paper's order of methods in its tables (ours, the threshold policy, last).
METHOD_ORDER = ("Empower", "SFT-10", "SFT-20", "SFT-RAND-1-30", "Base", "Base-10", "Base-20", "Threshold")
REFERENCE_METHOD = "Empower"


@dataclass
class ReportConfig:
    """What ``empower report`` reads and where it writes."""

    runs: list[Path] = option(help="run folders, or folders holding them (e.g. a reproduce folder)")
    out: Path | None = option(None, "report folder (default: RUN/report for one folder, else ./report)")

    def __post_init__(self):
        if not self.runs:
            raise ValueError("runs is empty: give at least one run folder")
        self.runs = [Path(r) for r in self.runs]
        if self.out is None:
            self.out = self.runs[0] / "report" if len(self.runs) == 1 else Path("report")
        self.out = Path(self.out)


@dataclass
class RunEntry:
    """One evaluation run with the labels it is reported under."""

    path: Path
    method: str
    human: str
    tasks: str
    summary: Summary
    lengths: list[int]  # suggestion lengths (counted tokens) over all episodes


@dataclass
class Sweep:
    """An eta sweep (``calibration.json``): one run per eta, with the eta it recommends."""

    path: Path
    etas: list[float]
    summaries: list[Summary]
    recommended: float
    description: str


def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "traces.jsonl").is_file()


def _label_from_config(config: dict) -> str:
    policy = config.get("policy", "model")
    if policy == "base":
        return "Base"
    if policy == "base-n":
        return f"Base-{config.get('n')}"
    if policy == "threshold":
        return "Threshold"
    return Path(str(config.get("assistant", "?"))).name


def _human_label(config: dict) -> str:
    if config.get("human") == "llm":
        return f"llm ({Path(str(config.get('human_model') or config.get('human_url') or '?')).name})"
    return str(config.get("human", "?"))


def _entry(path: Path, labels: dict | None = None) -> RunEntry:
    config = json.loads((path / "config.json").read_text())
    labels = labels or {}
    summary = summarize_run(path)
    return RunEntry(
        path=path,
        method=labels.get("method") or _label_from_config(config),
        human=labels.get("human") or _human_label(config),
        tasks=labels.get("tasks") or str(config.get("tasks", "?")),
        summary=summary,
        lengths=[n for episode in run_episodes(path) for n in episode.suggestion_tokens],
    )


def load_sweep(path: str | Path) -> Sweep:
    """Read a ``calibration.json`` (written by ``reproduce.calibrate``) and summarize its runs."""
    path = Path(path)
    record = json.loads(path.read_text())
    points = sorted(record["runs"], key=lambda point: point["eta"])
    return Sweep(
        path=path,
        etas=[float(point["eta"]) for point in points],
        summaries=[summarize_run(path.parent / point["run"]) for point in points],
        recommended=float(record["recommended"]),
        description=record.get("description", ""),
    )


def collect_runs(paths: list[str | Path]) -> tuple[list[RunEntry], list[Sweep], list[dict]]:
    """Run entries, sweeps and reproduce records (``grid.json`` contents) found under ``paths``.

    Raises FileNotFoundError for a path that does not exist or holds no run folder.
    """
    entries: list[RunEntry] = []
    sweeps: list[Sweep] = []
    grids: list[dict] = []
    seen: set[Path] = set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist (expected a run folder or a folder of runs)")
        labels: dict[Path, dict] = {}
        for grid_file in sorted(root.rglob("grid.json")):
            grid = json.loads(grid_file.read_text())
            grids.append(grid)
            for run in grid.get("runs", []):
                labels[(grid_file.parent / run["run"]).resolve()] = run
        sweep_roots = []
        for calibration in sorted(root.rglob("calibration.json")):
            sweeps.append(load_sweep(calibration))
            sweep_roots.append(calibration.parent.resolve())
        candidates = [root] if _is_run(root) else sorted(p.parent for p in root.rglob("traces.jsonl"))
        for folder in candidates:
            resolved = folder.resolve()
            in_sweep = any(resolved.is_relative_to(s) for s in sweep_roots)
            if resolved in seen or not _is_run(folder) or (in_sweep and resolved not in labels):
                continue
            seen.add(resolved)
            entries.append(_entry(folder, labels.get(resolved)))
        if not candidates and not sweeps:
            raise FileNotFoundError(f"no run folder (config.json + traces.jsonl) under {root}")
    return entries, sweeps, grids


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _ordered(values, key=None) -> list:
    return sorted(dict.fromkeys(values), key=key)


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg backend: no display needed)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


METRICS = (("Pass@1", "pass_at_1"), ("Acceptance rate", "acceptance"), ("DPR", "dpr"))


def _errors(estimates: list[Estimate | None]) -> tuple[list[float], list[list[float]]]:
    values, low, high = [], [], []
    for est in estimates:
        value = est.value if est else 0.0
        values.append(value)
        low.append(value - est.low if est and est.low is not None else 0.0)
        high.append(est.high - value if est and est.high is not None else 0.0)
    return values, [low, high]


def plot_metrics(entries: list[RunEntry], path: Path, title: str) -> Path:
    """Bars of Pass@1, acceptance and DPR per method (one bar per human) with 95% CI error bars."""
    plt = _plt()
    methods = _ordered((e.method for e in entries), _method_key)
    humans = _ordered(e.human for e in entries)
    by_key = {(e.method, e.human): e.summary for e in entries}
    width = 0.8 / len(humans)
    fig, axes = plt.subplots(
        1, 3, figsize=(min(16.0, 4.0 + 1.5 * len(methods)), 4.5), constrained_layout=True
    )
    for ax, (name, attr) in zip(axes, METRICS, strict=True):
        for h, human in enumerate(humans):
            estimates = [getattr(by_key[(m, human)], attr) if (m, human) in by_key else None for m in methods]
            values, yerr = _errors(estimates)
            xs = [i + (h - (len(humans) - 1) / 2) * width for i in range(len(methods))]
            ax.bar(xs, values, width, yerr=yerr, capsize=3, label=human, color=f"C{h}")
        ax.set_title(name)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]) if attr == "acceptance" else None)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), title="human", loc="outside upper right", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lengths(entries: list[RunEntry], path: Path, title: str) -> Path:
    """Box plots of suggestion lengths (tokens) per method, one panel per human; means marked."""
    plt = _plt()
    humans = _ordered(e.human for e in entries)
    fig, axes = plt.subplots(
        1, len(humans), figsize=(5.5 * len(humans), 4.2), squeeze=False, constrained_layout=True
    )
    for ax, human in zip(axes[0], humans, strict=True):
        runs = sorted((e for e in entries if e.human == human), key=lambda e: _method_key(e.method))
        data = [e.lengths or [0] for e in runs]
        ax.boxplot(data, showmeans=True, tick_labels=[e.method for e in runs])
        ax.tick_params(axis="x", rotation=35)
        ax.set_ylabel("suggestion length (tokens)")
        ax.set_title(f"human: {human}")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(sweep: Sweep, path: Path) -> Path:
    """DPR, acceptance and mean suggestion length against eta, with the recommended eta marked."""
    plt = _plt()
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), constrained_layout=True)
    for ax, (name, attr) in zip(axes[:2], (("DPR", "dpr"), ("Acceptance rate", "acceptance")), strict=True):
        values, yerr = _errors([getattr(s, attr) for s in sweep.summaries])
        ax.errorbar(sweep.etas, values, yerr=yerr, marker="o", capsize=3)
        ax.set_title(name)
    lengths = [s.mean_suggestion_tokens or 0.0 for s in sweep.summaries]
    axes[2].plot(sweep.etas, lengths, marker="o")
    axes[2].set_title("Mean suggestion length (tokens)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("eta (bits)")
        ax.axvline(
            sweep.recommended, color="C3", linestyle="--", label=f"recommended eta = {sweep.recommended:g}"
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Markdown


def _cell(estimate: Estimate | None, best: bool = False) -> str:
    if estimate is None:
        return "n/a"
    text = estimate.format()
    return f"**{text}**" if best else text


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(entries: list[RunEntry]) -> str:
    """Methods x (human, metric), the layout of the paper's Tables 1-2; the best value per column bold."""
    methods = _ordered((e.method for e in entries), _method_key)
    humans = _ordered(e.human for e in entries)
    by_key = {(e.method, e.human): e.summary for e in entries}
    header = ["Method"] + [f"{name} ({human})" for human in humans for name, _ in METRICS]
    best = {}
    for human in humans:
        for _, attr in METRICS:
            values = [
                getattr(s, attr).value for (m, h), s in by_key.items() if h == human and getattr(s, attr)
            ]
            # No bold when every method ties: there is no best.
            best[(human, attr)] = max(values) if values and min(values) < max(values) else None
    rows = []
    for method in methods:
        row = [method]
        for human in humans:
            summary = by_key.get((method, human))
            for _, attr in METRICS:
                estimate = getattr(summary, attr) if summary else None
                row.append(_cell(estimate, estimate is not None and estimate.value == best[(human, attr)]))
        rows.append(row)
    return _table(header, rows)


def detail_table(entries: list[RunEntry]) -> str:
    """Effort and suggestion statistics per run (what DPR is discounted by)."""
    header = [
        "Method",
        "Human",
        "Tasks",
        "Suggestions/ep",
        "Mean length (tok)",
        "Mean length (chars)",
        "Read/ep",
        "Written/ep",
        "Turns/ep",
        "Run",
    ]
    rows = []
    for e in sorted(entries, key=lambda e: (e.human, _method_key(e.method))):
        s = e.summary
        done = f"{s.episodes}" + ("" if s.complete or s.expected is None else f"/{s.expected} (incomplete)")
        rows.append(
            [
                e.method,
                e.human,
                done,
                f"{s.suggestions_per_episode:.1f}",
                _fmt(s.mean_suggestion_tokens),
                _fmt(s.mean_suggestion_chars),
                f"{s.tokens_read.value:.1f}",
                f"{s.tokens_written.value:.1f}",
                f"{s.mean_turns:.1f}",
                f"`{e.path.parent.name}/{e.path.name}`",
            ]
        )
    return _table(header, rows, ["---", "---"] + ["--:"] * 7 + ["---"])


def paired_table(entries: list[RunEntry]) -> str | None:
    """Empower against every other method with the same human on the same tasks (paired tests)."""
    rows = []
    for reference in sorted((e for e in entries if e.method == REFERENCE_METHOD), key=lambda e: e.human):
        others = [e for e in entries if e.human == reference.human and e.method != REFERENCE_METHOD]
        for other in sorted(others, key=lambda e: _method_key(e.method)):
            c = compare_runs(reference.path, other.path)
            rows.append(
                [
                    other.method,
                    reference.human,
                    str(c.tasks),
                    f"{c.pass_a:.3f} vs {c.pass_b:.3f}",
                    f"{c.only_a_passed} / {c.only_b_passed}",
                    c.pass_difference.format(),
                    f"{c.mcnemar_p:.3g}",
                    c.dpr_difference.format(),
                    f"{c.wilcoxon_p:.3g}",
                ]
            )
    if not rows:
        return None
    header = [
        "Empower vs",
        "Human",
        "Tasks",
        "Pass@1",
        "Only Empower / only other passed",
        "Pass@1 difference (Newcombe 95% CI)",
        "McNemar p",
        "DPR difference [95% CI]",
        "Wilcoxon p",
    ]
    return _table(header, rows, ["---", "---"] + ["--:"] * 7)


def sweep_table(sweep: Sweep) -> str:
    rows = [
        [
            f"{eta:g}" + (" (recommended)" if eta == sweep.recommended else ""),
            _cell(s.dpr),
            _cell(s.acceptance),
            _cell(s.pass_at_1),
            _fmt(s.mean_suggestion_tokens),
            str(s.episodes),
        ]
        for eta, s in zip(sweep.etas, sweep.summaries, strict=True)
    ]
    return _table(["eta (bits)", "DPR", "Acceptance", "Pass@1", "Mean length (tok)", "Tasks"], rows)


def sensitivity(sweep: Sweep) -> str:
    """How much each metric moves over the sweep, and which etas are within the best DPR's CI."""
    best = max(sweep.summaries, key=lambda s: s.dpr.value)
    close = [
        eta
        for eta, s in zip(sweep.etas, sweep.summaries, strict=True)
        if best.dpr.low is None or s.dpr.value >= best.dpr.low
    ]
    lines = []
    for name, attr in (("DPR", "dpr"), ("Acceptance", "acceptance"), ("Pass@1", "pass_at_1")):
        values = [getattr(s, attr).value for s in sweep.summaries if getattr(s, attr) is not None]
        if values:
            lines.append(f"- {name} ranges from {min(values):.3f} to {max(values):.3f} over the sweep.")
    lengths = [s.mean_suggestion_tokens for s in sweep.summaries if s.mean_suggestion_tokens is not None]
    if lengths:
        lines.append(f"- Mean suggestion length ranges from {min(lengths):.1f} to {max(lengths):.1f} tokens.")
    lines.append(
        f"- Etas whose DPR lies inside the 95% CI of the best one: {', '.join(f'{e:g}' for e in close)} "
        "(the data do not separate these)."
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "tasks"


def _provenance(grids: list[dict]) -> list[str]:
    lines = []
    for grid in grids:
        if grid.get("command"):
            lines.append(f"- Command: `{grid['command']}`")
        if grid.get("config"):
            lines.append(f"- Config: `{grid['config']}`")
        if grid.get("wall_time_s") is not None:
            cpu = grid.get("cpu_time_s")
            lines.append(
                f"- Wall time of the stages: {grid['wall_time_s'] / 60:.1f} min"
                + (f", CPU time {cpu / 60:.1f} min" if cpu is not None else "")
                + f" ({grid.get('machine', '')})"
            )
        cpu = grid.get("stage_cpu_seconds", {})
        for stage, seconds in grid.get("stage_seconds", {}).items():
            extra = f" (CPU {cpu[stage] / 60:.1f} min)" if stage in cpu else ""
            lines.append(f"  - {stage}: {seconds / 60:.1f} min{extra}")
    return lines


def _counting_caveat(group: list[RunEntry]) -> list[str]:
    """A warning when the runs of a table counted tokens with different tokenizers (DPR then is not comparable)."""
    by_tokenizer: dict[str, list[str]] = {}
    for entry in group:
        by_tokenizer.setdefault(entry.summary.count_tokenizer or "unrecorded", []).append(entry.method)
    if len(by_tokenizer) < 2:
        return []
    which = "; ".join(f"{name} ({', '.join(methods)})" for name, methods in by_tokenizer.items())
    return [
        f"**Warning: these runs counted tokens with different tokenizers** ({which}): tokens and DPR are "
        "not comparable across them; rerun with one `sim_count_tokenizer`.",
        "",
    ]


def render_markdown(entries: list[RunEntry], sweeps: list[Sweep], grids: list[dict], out: Path) -> str:
    """The report's Markdown; writes its figures under ``out/figures``."""
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    parts = ["# Empower: evaluation report", ""]
    parts += _provenance(grids)
    parts += [
        "",
        "Pass@1 = share of tasks whose final program passes all tests; acceptance = accepted / shown "
        "suggestions (pooled); DPR = 1[passed] * gamma^(alpha * tokens read + beta * tokens written), "
        "averaged over tasks. Brackets: 95% intervals, Wilson score for Pass@1 and acceptance, BCa bootstrap "
        "over tasks for DPR and tokens. Bold: best in its column "
        "(point estimate; see the intervals and the paired tests before reading it as a win).",
        "",
    ]
    for tasks in _ordered(e.tasks for e in entries):
        group = [e for e in entries if e.tasks == tasks]
        slug = _slug(tasks)
        parts += [f"## Task set: {tasks}", "", *_counting_caveat(group), main_table(group), ""]
        plot_metrics(group, figures / f"metrics-{slug}.png", f"{tasks}: 95% CIs over tasks")
        parts += [f"![Pass@1, acceptance and DPR on {tasks}](figures/metrics-{slug}.png)", ""]
        parts += ["### Effort and suggestions", "", detail_table(group), ""]
        plot_lengths(group, figures / f"lengths-{slug}.png", f"{tasks}: suggestion lengths (means marked)")
        parts += [f"![Suggestion lengths on {tasks}](figures/lengths-{slug}.png)", ""]
        paired = paired_table(group)
        if paired:
            parts += [
                "### Paired tests (same tasks)",
                "",
                "Pass@1 difference (Empower minus other) with Newcombe's paired interval and McNemar's "
                "exact test; DPR difference with a paired BCa bootstrap interval and the Wilcoxon "
                "signed-rank test.",
                "",
                paired,
                "",
            ]
    for i, sweep in enumerate(sweeps):
        name = f"eta-sweep-{i}.png" if len(sweeps) > 1 else "eta-sweep.png"
        plot_sweep(sweep, figures / name)
        parts += [
            "## Choosing eta",
            "",
            sweep.description,
            "",
            f"**Recommended eta: {sweep.recommended:g} bits** (highest DPR on the validation tasks).",
            "",
            sweep_table(sweep),
            "",
            sensitivity(sweep),
            "",
            f"![eta sweep](figures/{name})",
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


def render_html(markdown: str, out: Path) -> str:
    """The Markdown as one self-contained HTML page (figures inlined as data URIs)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(match: re.Match) -> str:
        data = base64.b64encode((out / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', inline, body)
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>Empower report</title>"
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def build_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/`` for the runs under ``run_dirs``.

    Args:
        run_dirs: run folders, or folders holding them (a reproduce folder with ``grid.json``).
        out: the report folder (created).

    Returns:
        the path of ``report.md``.
    """
    entries, sweeps, grids = collect_runs(list(run_dirs))
    if not entries and not sweeps:
        raise FileNotFoundError(f"no evaluation runs found under {', '.join(map(str, run_dirs))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(entries, sweeps, grids, out)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(render_html(markdown, out))
    return out / "report.md"
