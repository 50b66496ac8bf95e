"""The pipeline's report: one HTML page with PNG plots and a Markdown summary (log_root/report.{html,md}).

It only reads the run folder: the stages' metrics.jsonl, rm/pm_eval.json, rm/pm_scaling.json (the judge's
data-scaling curve), stage_times.json, seeds.json (RL over seeds), rl/timeline.jsonl (when each part of RL ran), the
RL rollout pages
(rl/iteration_NNNNNN/train.html, linked) and the replies the pipeline sampled into report_replies.json (base, SFT
and RLHF, with their sampling settings). No model is loaded.

    python -m rlhfkit.report RUN_FOLDER
"""

from __future__ import annotations

import html
import itertools
import json
import math
from pathlib import Path
from typing import Any, Sequence

from rlhfkit.errors import DataError
from rlhfkit.run_files import (
    COMPARISON_FILE,
    DPO_DIR,
    ITERATION_DIR_PREFIX,
    METRICS_FILE,
    PIPELINE_CONFIG_FILE,
    PM_EVAL_FILE,
    PM_SCALING_FIGURE,
    PM_SCALING_FILE,
    REPORT_DIR,
    REPORT_HTML_FILE,
    REPORT_MD_FILE,
    REPORT_REPLIES_FILE,
    RL_DIR,
    RL_TIMELINE_FIGURE,
    RM_DIR,
    SEEDS_FILE,
    STAGE_CONFIG_FILE,
    STAGE_TIMES_FILE,
    TIMELINE_FILE,
    TRAIN_HTML_FILE,
    stage_figure,
)
from rlhfkit.utils.atomic import read_jsonl, write_text_atomic
from rlhfkit.utils.plots import plot_metrics

PANELS = {
    "sft": [["train_mean_nll", "test/nll"], ["learning_rate"]],
    "rm": [["train_mean_nll", "test/nll"], ["learning_rate"]],
    "rl": [
        ["test/win_rate"],
        ["env/all/reward/total", "env/all/win_minus_loss"],
        ["env/all/ac_tokens_per_turn"],
        ["kl/policy_vs_init", "optim/kl_sample_train_v1"],
        ["env/all/frac_truncated", "env/all/format"],
        ["optim/entropy"],
    ],
}
# The tutorial's summary table (Qwen3.5-9B-Base, batch 256): (stage, metric key, tutorial start, tutorial end).
TUTORIAL_TABLE = [
    ("SFT", "sft", "test/nll", 1.99, 1.92),
    ("Preference model", "rm", "test/nll", 7.0, 0.55),
    ("RL", "rl", "test/win_rate", 0.45, 0.70),
]


def first_last(records: list[dict], key: str) -> tuple[Any, Any, int]:
    values = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not values:
        return None, None, 0
    return values[0][1], values[-1][1], values[-1][0]


def final_win_rate(log_root: str | Path) -> str | None:
    """One line: the RLHF policy's last measured win rate (± stderr) against the human-chosen replies, and its first
    one; None before RL measured any."""
    records = [
        r
        for r in read_jsonl(Path(log_root) / RL_DIR / METRICS_FILE)
        if isinstance(r.get("test/win_rate"), (int, float))
    ]
    if not records:
        return None
    first, last = records[0], records[-1]
    stderr = f" ± {100 * last['test/stderr']:.1f}%" if isinstance(last.get("test/stderr"), (int, float)) else ""
    return (
        f"final win rate vs the human-chosen replies: {100 * last['test/win_rate']:.1f}%{stderr} at RL step "
        f"{last['step']} (step {first['step']}: {100 * first['test/win_rate']:.1f}%)"
    )


def rollout_pages(root: Path) -> list[tuple[str, str]]:
    """(iteration, path relative to root) of each RL rollout page, rl/iteration_NNNNNN/train.html, in order."""
    return [
        (str(int(page.parent.name.removeprefix(ITERATION_DIR_PREFIX))), page.relative_to(root).as_posix())
        for page in sorted(root.glob(f"{RL_DIR}/{ITERATION_DIR_PREFIX}*/{TRAIN_HTML_FILE}"))
    ]


def sampling_text(replies_file: dict) -> str:
    sampling = replies_file.get("sampling")
    if not sampling:
        return "Sampling settings not recorded."
    return (
        f"One reply each, sampled at temperature {sampling['temperature']}, at most {sampling['max_tokens']} "
        f"tokens, seed {sampling['seed']}."
    )


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if "win_rate" in key else f"{value:.3f}"


def _conversation_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


REPLY_COLUMNS = [("base", "base"), ("sft", "SFT"), ("rlhf", "RLHF")]  # (key in report_replies.json, label)
DPO_PANELS = [
    ["dpo_loss", "test/dpo_loss"],
    ["accuracy", "test/accuracy"],
    ["margin", "chosen_reward", "rejected_reward"],
]
POLICY_NAMES = {"sft": "SFT", "dpo": "DPO", "rlhf": "RLHF"}


def comparison_section(root: Path, out_dir: Path, times: dict[str, float]) -> tuple[list[str], str]:
    """Markdown lines and HTML of the SFT / DPO / RLHF comparison in root/comparison.json (written by the
    pipeline with method=both), with DPO's curves; nothing if the file is absent."""
    path = root / COMPARISON_FILE
    if not path.exists():
        return [], ""
    comparison = json.loads(path.read_text())
    stage_of = {"sft": "sft", "dpo": "dpo", "rlhf": "rl"}
    rows = [
        (
            POLICY_NAMES.get(name, name),
            f"{100 * r['win_rate']:.1f}% ± {100 * r['stderr']:.1f}%",
            f"{r['mean_reply_tokens']:.1f}",
            f"{r['kl_from_sft']:.2f}",
            f"{times[stage_of[name]] / 60:.1f} min" if stage_of.get(name) in times else "–",
        )
        for name, r in comparison["policies"].items()
    ]
    header = (
        "policy",
        "win rate vs human-chosen (± stderr)",
        "mean reply tokens",
        "KL from SFT (nats/reply)",
        "stage wall time",
    )
    intro = (
        f"Each policy answers the same {comparison['n_prompts']} held-out prompts (temperature "
        f"{comparison['temperature']}, at most {comparison['max_tokens']} tokens); the run's preference model "
        f"judges each reply against the human-chosen one in both orders."
        + (f" RLHF's wall time excludes the preference model's ({times['rm'] / 60:.1f} min)." if "rm" in times else "")
    )
    figure = stage_figure(DPO_DIR)
    plot = plot_metrics(read_jsonl(root / DPO_DIR / METRICS_FILE), out_dir / figure, panels=DPO_PANELS, title="dpo")
    names = list(comparison["policies"])
    md, table = table_section(
        "SFT vs DPO vs RLHF", intro, header, rows, image=f"{REPORT_DIR}/{figure}" if plot else None, level=2
    )
    for item in comparison["replies"]:
        md += [
            f"**Prompt:** {_conversation_text(item['prompt'])}",
            "",
            f"- **human-chosen:** {item['human_chosen']}",
            *[f"- **{POLICY_NAMES.get(n, n)}:** {item[n]}" for n in names],
            "",
        ]
    esc = html.escape
    replies = "".join(
        f"<div class='pair'><div class='prompt'>{esc(_conversation_text(i['prompt']))}</div><div class='cols'>"
        + "".join(
            f"<div><h4>{esc(label)}</h4><pre>{esc(text)}</pre></div>"
            for label, text in [("human-chosen", i["human_chosen"]), *[(POLICY_NAMES.get(n, n), i[n]) for n in names]]
        )
        + "</div></div>"
        for i in comparison["replies"]
    )
    return md, table + replies


JUDGE_HEADER = (
    "held-out comparisons",
    "n",
    "accuracy (both orders, 95% CI)",
    "order-symmetric accuracy (95% CI)",
    "verdicts 'A' (50% = no position bias)",
    "judge picks the longer reply",
    "people preferred the longer",
)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def judge_section(pm: dict, settings: dict) -> tuple[list[str], str]:
    """Markdown lines and HTML of the judge table from rm/pm_eval.json: accuracy in distribution (`pm/`) and out
    of distribution (`ood/`, HH-RLHF splits the preference model never trained on), order-symmetric accuracy,
    position bias and length bias; nothing if the file has no evaluation."""
    data = settings.get("pref_data") or settings.get("hh_data") or "all four offline HH-RLHF splits"
    sets = [("pm", f"in distribution ({data})"), ("ood", f"out of distribution ({pm.get('ood/splits', '')})")]
    rows = []
    for prefix, label in sets:
        if f"{prefix}/accuracy" not in pm:
            continue
        m = {key.removeprefix(f"{prefix}/"): value for key, value in pm.items() if key.startswith(f"{prefix}/")}
        rows.append(
            (
                label,
                f"{int(m['n'])}",
                f"{_pct(m['accuracy'])} [{_pct(m.get('accuracy_ci_low'))}, {_pct(m.get('accuracy_ci_high'))}]",
                f"{_pct(m.get('accuracy_symmetric'))} [{_pct(m.get('accuracy_symmetric_ci_low'))}, "
                f"{_pct(m.get('accuracy_symmetric_ci_high'))}]",
                _pct(m.get("frac_A")),
                _pct(m.get("frac_longer_picked")),
                _pct(m.get("frac_longer_preferred")),
            )
        )
    if not rows:
        return [], ""
    note = (
        "Each comparison is judged in both A/B orders. Order-symmetric: both orders' probabilities combined (a "
        "judge that only reads the position scores 50%). A judge that follows length rather than content picks "
        "the longer reply more often than people preferred it."
    )
    return table_section("Judge: content or position?", note, JUDGE_HEADER, rows)


def table_section(
    title: str,
    note: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    image: str | None = None,
    level: int = 3,
) -> tuple[list[str], str]:
    """Markdown lines and HTML of a report section: a title (a heading of `level`), a note, a table and
    optionally an image (a path relative to the report)."""
    md = [
        f"{'#' * level} {title}",
        "",
        note,
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        *([f"![{title}]({image})", ""] if image else []),
    ]
    esc = html.escape
    page = (
        f"<h{level}>{esc(title)}</h{level}><p>{esc(note)}</p><table><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        + "</table>"
        + (f"<img src='{esc(image)}'>" if image else "")
    )
    return md, page


SCALING_HEADER = (
    "training comparisons",
    "steps",
    "in distribution: accuracy (both orders)",
    "order-symmetric",
    "out of distribution: accuracy (both orders)",
    "order-symmetric",
    "verdicts 'A' (out of distribution)",
)


def scaling_section(root: Path, out_dir: Path) -> tuple[list[str], str]:
    """Markdown lines and HTML of the judge's data-scaling curve in root/rm/pm_scaling.json (written by the pipeline
    with pm_scaling_points > 0), with its plot; nothing if the file is absent."""
    points = _read_json(root / RM_DIR / PM_SCALING_FILE).get("points", [])
    if not points:
        return [], ""
    rows = [
        (
            str(p["comparisons"]),
            str(p["steps"]),
            _pct(p.get("pm/accuracy")),
            _pct(p.get("pm/accuracy_symmetric")),
            _pct(p.get("ood/accuracy")),
            _pct(p.get("ood/accuracy_symmetric")),
            _pct(p.get("ood/frac_A")),
        )
        for p in points
    ]
    records = [{"step": p["comparisons"], **p} for p in points]
    panels = [
        ["pm/accuracy", "ood/accuracy", "pm/accuracy_symmetric", "ood/accuracy_symmetric"],
        ["pm/frac_A", "ood/frac_A"],
    ]
    plot = plot_metrics(
        records, out_dir / PM_SCALING_FIGURE, panels=panels, title="judge vs data", xlabel="training comparisons"
    )
    note = (
        f"The preference model's checkpoints along its run, on the held-out comparisons of the table above "
        f"({int(points[-1].get('pm/n', 0))} in distribution, {int(points[-1].get('ood/n', 0))} out). The points "
        f"share one learning-rate schedule: an early point was not trained to the end of a decay."
    )
    return table_section(
        "Judge: accuracy against training comparisons",
        note,
        SCALING_HEADER,
        rows,
        image=f"{REPORT_DIR}/{PM_SCALING_FIGURE}" if plot else None,
    )


def seeds_section(root: Path) -> tuple[list[str], str]:
    """Markdown lines and HTML of the RL win-rate gain over seeds in root/seeds.json (written by the pipeline
    with seeds >= 2); nothing if the file is absent."""
    summary = _read_json(root / SEEDS_FILE)
    if not summary:
        return [], ""
    header = ("RL run", "seed", "first win rate (step)", "last win rate (step)", "gain (points)")
    rows = [
        (
            r["folder"],
            str(r["seed"]),
            f"{_pct(r['first'])} ({r['first_step']})",
            f"{_pct(r['last'])} ({r['last_step']})",
            f"{100 * r['gain']:+.1f}",
        )
        for r in summary["runs"]
    ]
    line = (
        f"Win-rate gain (last minus first test/win_rate) over {summary['n']} seeds: "
        f"{100 * summary['mean_gain']:+.1f} points, {100 * summary['confidence']:.0f}% t-interval "
        f"[{100 * summary['ci_low']:+.1f}, {100 * summary['ci_high']:+.1f}]. Every run starts from the same SFT "
        f"policy and is judged by the same preference model on the same prompts."
    )
    return table_section("RL over seeds", line, header, rows, level=2)


def timeline_section(root: Path, out_dir: Path) -> tuple[list[str], str]:
    """Markdown lines and HTML of the RL timeline (rl/timeline.jsonl, rl/timeline.py): when sampling, judging,
    training, evaluation and checkpointing ran in each iteration, drawn to report/rl_timeline.png, with the RL
    loop's mode and its median wall time per iteration; nothing if the file is absent."""
    from rlhfkit.rl.timeline import plot_timeline

    spans = read_jsonl(root / RL_DIR / TIMELINE_FILE)
    if not spans or not plot_timeline(spans, out_dir / RL_TIMELINE_FIGURE, title="RL timeline"):
        return [], ""
    config = _read_json(root / RL_DIR / STAGE_CONFIG_FILE)
    mode = ", ".join(
        f"{key} {value}" for key in ("async_config", "stream_minibatch_config") if (value := config.get(key))
    )
    ends = sorted(s["end"] for s in spans if s["kind"] == "train" and s["step"] >= 0)
    last_end_per_step = sorted({s["step"]: s["end"] for s in spans if s["kind"] == "train" and s["step"] >= 0}.values())
    gaps = [b - a for a, b in itertools.pairwise(last_end_per_step) if b > a]
    per_iteration = f"; median {sorted(gaps)[len(gaps) // 2]:.1f} s per iteration" if gaps else ""
    line = (
        f"RL loop: {mode or 'synchronous'}; {len(last_end_per_step)} iterations{per_iteration} (between the ends "
        f"of consecutive iterations' training; {len(ends)} training steps). Colour: the iteration a span served; "
        "grey: sampled, then thrown away as too stale (sampled again)."
    )
    figure = f"{REPORT_DIR}/{RL_TIMELINE_FIGURE}"
    md = ["## RL timeline", "", line, "", f"![RL timeline]({figure})", ""]
    page = f"<h2>RL timeline</h2><p>{html.escape(line)}</p><img src='{figure}'>"
    return md, page


def _read_json(path: Path) -> Any:
    """A JSON file of the run ({} if absent); a damaged one is a DataError naming it and the line."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); repair or remove it"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); repair or remove it") from None


def write_report(log_root: str | Path) -> dict[str, str]:
    """Write log_root/report.{html,md} and the plots in log_root/report/ from the run folder's files."""
    root = Path(log_root)
    replies_file = _read_json(root / REPORT_REPLIES_FILE)
    settings = _read_json(root / PIPELINE_CONFIG_FILE)
    base_model = replies_file.get("base_model") or settings.get("base_model", "?")
    renderer_name = replies_file.get("renderer_name") or settings.get("renderer_name") or "?"
    replies = replies_file.get("replies", [])
    out_dir = root / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {stage: read_jsonl(root / stage / METRICS_FILE) for stage in ("sft", "rm", "rl")}  # folder: stage
    plots = {}
    for stage, panels in PANELS.items():
        if plot_metrics(records[stage], out_dir / stage_figure(stage), panels=panels, title=f"{stage} ({base_model})"):
            plots[stage] = f"{REPORT_DIR}/{stage_figure(stage)}"
    pm = _read_json(root / RM_DIR / PM_EVAL_FILE)
    times = _read_json(root / STAGE_TIMES_FILE)

    rows = []
    for label, stage, key, t_start, t_end in TUTORIAL_TABLE:
        start, end, last_step = first_last(records[stage], key)
        rows.append(
            (
                label,
                key,
                f"{_fmt(t_start, key)} → {_fmt(t_end, key)}",
                f"{_fmt(start, key)} → {_fmt(end, key)} (last eval at step {last_step})",
            )
        )
    pm_lines = []
    if pm:
        pm_lines = [
            f"accuracy (both orders) {100 * pm['pm/accuracy']:.1f}% (95% CI {100 * pm['pm/accuracy_ci_low']:.1f}–"
            f"{100 * pm['pm/accuracy_ci_high']:.1f}%) on {int(pm['pm/n'])} held-out comparisons",
            f"accuracy as given / swapped: {100 * pm['pm/accuracy_original']:.1f}% / "
            f"{100 * pm['pm/accuracy_swapped']:.1f}%",
            f"position bias: {100 * pm['pm/frac_A']:.1f}% of verdicts are 'A' (50% = none); order agreement "
            f"{100 * pm['pm/order_agreement']:.1f}%; mean P(correct) {pm['pm/mean_p_correct']:.3f}",
        ]
    judge_md, judge_html = judge_section(pm, settings)
    scaling_md, scaling_html = scaling_section(root, out_dir)
    seeds_md, seeds_html = seeds_section(root)
    timeline_md, timeline_html = timeline_section(root, out_dir)
    time_line = ", ".join(f"{stage} {times[stage] / 60:.1f} min" for stage in ("sft", "rm", "rl") if stage in times)
    win_rate_line = final_win_rate(root)
    rollouts = rollout_pages(root)
    columns = [(key, label) for key, label in REPLY_COLUMNS if any(key in item for item in replies)]
    sampling = sampling_text(replies_file)

    md = [
        f"# RLHF pipeline report — {base_model}",
        "",
        f"Log root `{root}`; renderer `{renderer_name}`. Wall time: {time_line or 'n/a'}.",
        "",
        *([f"RLHF policy's {win_rate_line}.", ""] if win_rate_line else []),
        "| stage | metric | tutorial (Qwen3.5-9B-Base) | this run |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "## Preference model (held out)",
        "",
        *[f"- {line}" for line in pm_lines],
        "",
        *judge_md,
        *scaling_md,
        *seeds_md,
        *timeline_md,
        "## Curves",
        "",
        *[f"![{stage}]({path})" for stage, path in plots.items()],
        "",
        "RL rollouts (the logged groups of each iteration): "
        + (", ".join(f"[{it}]({path})" for it, path in rollouts) or "none"),
        "",
        "## Base model vs SFT vs RLHF model",
        "",
        sampling,
        "",
    ]
    for item in replies:
        md += [
            f"**Prompt:** {_conversation_text(item['prompt'])}",
            "",
            *[f"- **{label}:** {item.get(key, '–')}" for key, label in columns],
            "",
        ]
    comparison_md, comparison_html = comparison_section(root, out_dir, times)
    md += comparison_md
    write_text_atomic(root / REPORT_MD_FILE, "\n".join(md) + "\n")

    esc = html.escape
    table = "".join(
        f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td><td>{esc(d)}</td></tr>" for a, b, c, d in rows
    )
    reply_html = "".join(
        f"<div class='pair'><div class='prompt'>{esc(_conversation_text(i['prompt']))}</div>"
        "<div class='cols'>"
        + "".join(f"<div><h4>{esc(label)}</h4><pre>{esc(i.get(key, '–'))}</pre></div>" for key, label in columns)
        + "</div></div>"
        for i in replies
    )
    win_rate_html = f"<p><b>RLHF policy's {esc(win_rate_line)}.</b></p>" if win_rate_line else ""
    rollout_html = ", ".join(f"<a href='{esc(path)}'>{esc(it)}</a>" for it, path in rollouts) or "none"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>RLHF report — {esc(base_model)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
.cols{{display:flex;gap:1em}}.cols>div{{flex:1}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:.5em}}
.prompt{{font-weight:bold;white-space:pre-wrap;margin-top:1.5em}}img{{max-width:100%}}</style></head><body>
<h1>RLHF pipeline report — {esc(base_model)}</h1>
<p>Log root <code>{esc(str(root))}</code>; renderer <code>{esc(renderer_name)}</code>.
Wall time: {esc(time_line or "n/a")}.</p>
{win_rate_html}
<table><tr><th>stage</th><th>metric</th><th>tutorial (Qwen3.5-9B-Base)</th><th>this run</th></tr>{table}</table>
<h2>Preference model (held out)</h2><ul>{"".join(f"<li>{esc(line)}</li>" for line in pm_lines)}</ul>
{judge_html}{scaling_html}{seeds_html}{timeline_html}
<h2>Curves</h2>{"".join(f'<h3>{esc(s)}</h3><img src="{esc(p)}">' for s, p in plots.items())}
<p>RL rollouts (the logged groups of each iteration): {rollout_html}</p>
<h2>Base model vs SFT vs RLHF model</h2><p>{esc(sampling)}</p>{reply_html}{comparison_html}</body></html>"""
    write_text_atomic(root / REPORT_HTML_FILE, page)
    return {"html": str(root / REPORT_HTML_FILE), "markdown": str(root / REPORT_MD_FILE)}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or not Path(sys.argv[1], PIPELINE_CONFIG_FILE).exists():
        sys.exit("usage: python -m rlhfkit.report RUN_FOLDER (a folder with pipeline_config.json)")
    paths = write_report(sys.argv[1])
    print(f"report: {paths['html']}  and  {paths['markdown']}")
