"""Per-iteration rollout logs: a readable HTML page of the first groups and a JSONL summary (spec 8)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhfkit.rl.types import EnvGroupBuilder, TrajectoryGroup
from rlhfkit.run_files import iteration_dir_name
from rlhfkit.utils.atomic import rewrite_jsonl_atomic, write_text_atomic

STYLE = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; }
pre { white-space: pre-wrap; background: #f5f5f5; padding: .4em; margin: .2em 0; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: .2em .5em; }
.group { border-top: 2px solid #444; margin-top: 2em; } .bad { color: #b00; } .good { color: #070; }
"""


def iteration_dir(log_path: str | Path, iteration: int) -> Path:
    return Path(log_path) / iteration_dir_name(iteration)


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _verdict_text(verdict: float, a: str, b: str) -> str:
    if verdict < 0:
        return f"verdict {verdict:+.2f}: A preferred, {a} wins"
    if verdict > 0:
        return f"verdict {verdict:+.2f}: B preferred, {b} wins"
    return "verdict 0: tie / no usable answer"


def _group_html(
    group_idx: int, group: TrajectoryGroup, builder: EnvGroupBuilder, advantages: np.ndarray, tokenizer: Any
) -> str:
    logs = builder.reward_logs()
    first = group.trajectories_G[0].transitions[0]
    parts = [f'<div class="group"><h2>Group {group_idx}</h2>', "<h3>Prompt</h3>"]
    if "prompt" in logs:
        parts += [f"<b>{html.escape(str(m['role']))}</b>{_pre(str(m['content']))}" for m in logs["prompt"]]
    else:
        parts.append(_pre(tokenizer.decode(first.ob.to_ints())))
    replies = logs.get("replies")
    valid = logs.get("valid_format")
    parts.append("<h3>Completions</h3>")
    for k, traj in enumerate(group.trajectories_G):
        ac = traj.transitions[-1].ac
        parts.append(f"<h4>Completion {k}</h4>")
        if replies is not None:
            parts.append(_pre(replies[k]))
        if valid is not None:
            cls = "good" if valid[k] else "bad"
            parts.append(f'<div class="{cls}">Valid format: {valid[k]}</div>')
        parts.append(
            f"<details><summary>raw sampled text ({len(ac.tokens)} tokens, stop reason "
            f"{html.escape(str(ac.stop_reason))})</summary>{_pre(tokenizer.decode(ac.tokens))}</details>"
        )
    matchups = logs.get("matchups")
    if matchups is not None:
        parts.append(
            f"<h3>Pairwise comparisons</h3><p>Got {len(group.trajectories_G)} trajectories, doing "
            f"{len(matchups)} pairwise matchups.</p><ol start=0>"
        )
        for m in matchups:
            a = "the target" if m["A"] < 0 else f"completion {m['A']}"
            b = f"completion {m['B']}"
            parts.append(f"<li>{a} (A) vs {b} (B): {_verdict_text(m['verdict'], a, b)}</li>")
        parts.append("</ol>")
    parts.append("<h3>Rewards</h3><table><tr><th>completion</th><th>ac tokens</th><th>stop reason</th>")
    metric_keys = sorted({key for m in group.metrics_G for key in m})
    parts += [f"<th>{html.escape(key)}</th>" for key in metric_keys]
    parts.append("<th>total reward</th><th>advantage</th></tr>")
    for k, (traj, total, adv) in enumerate(zip(group.trajectories_G, group.get_total_rewards(), advantages)):
        ac = traj.transitions[-1].ac
        cells = [str(k), str(sum(len(t.ac.tokens) for t in traj.transitions)), html.escape(str(ac.stop_reason))]
        cells += [f"{group.metrics_G[k].get(key, float('nan')):.3f}" for key in metric_keys]
        cells += [f"{total:+.3f}", f"{adv:+.3f}"]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table></div>")
    return "\n".join(parts)


def write_train_html(
    path: str | Path,
    iteration: int,
    groups: Sequence[TrajectoryGroup],
    builders: Sequence[EnvGroupBuilder],
    advantages: Sequence[np.ndarray],
    tokenizer: Any,
) -> None:
    body = [f"<h1>Iteration {iteration}: training rollouts (first {len(groups)} groups)</h1>"]
    body += [
        _group_html(g, group, builder, adv, tokenizer)
        for g, (group, builder, adv) in enumerate(zip(groups, builders, advantages, strict=True))
    ]
    write_text_atomic(
        path,
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>Iteration {iteration}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n",
    )


def rollout_summary_records(
    groups: Sequence[TrajectoryGroup],
    builders: Sequence[EnvGroupBuilder],
    iteration: int,
    sampling_client_step: int | Sequence[int],
    split: str = "train",
) -> list[dict]:
    """One record per trajectory (schema_version 1). `sampling_client_step`: the optimizer steps the sampler's
    weights had seen, one for all groups or one per group (asynchronous RL)."""
    records = []
    steps = [sampling_client_step] * len(groups) if isinstance(sampling_client_step, int) else sampling_client_step
    for group_idx, (group, builder, sampler_step) in enumerate(zip(groups, builders, steps, strict=True)):
        for traj_idx, (traj, total, final) in enumerate(
            zip(group.trajectories_G, group.get_total_rewards(), group.final_rewards_G)
        ):
            records.append(
                {
                    "schema_version": 1,
                    "split": split,
                    "iteration": iteration,
                    "group_idx": group_idx,
                    "traj_idx": traj_idx,
                    "tags": builder.logging_tags(),
                    "sampling_client_step": sampler_step,
                    "total_reward": total,
                    "final_reward": final,
                    "trajectory_metrics": group.metrics_G[traj_idx],
                    "final_ob_len": traj.final_ob.length,
                    "steps": [
                        {
                            "step_idx": s,
                            "ob_len": t.ob.length,
                            "ac_len": len(t.ac.tokens),
                            "reward": t.reward,
                            "episode_done": t.episode_done,
                            "metrics": t.metrics,
                            "logs": t.logs,
                        }
                        for s, t in enumerate(traj.transitions)
                    ],
                }
            )
    return records


def write_rollout_summaries(path: str | Path, records: list[dict]) -> None:
    rewrite_jsonl_atomic(path, records)
