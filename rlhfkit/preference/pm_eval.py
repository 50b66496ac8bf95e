"""Held-out evaluation of a preference model: accuracy in both A/B orders, position bias, order agreement
and mean P(correct label), from one batched scoring pass over every comparison in both orders."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from tqdm import tqdm

from rlhfkit.evaluators import SamplingClientEvaluator
from rlhfkit.preference.types import (
    VERDICT_OF_LABEL,
    Comparison,
    Judgement,
    LabeledComparison,
    PreferenceModelFromChatRenderer,
    symmetric_p_b,
)
from rlhfkit.renderers import get_renderer, get_text_content
from rlhfkit.tokenizer_utils import get_tokenizer
from rlhfkit.engine.clients import SamplingClient

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def normal_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """mean ± z·stderr (ddof=1), clipped to [0, 1]."""
    n = len(values)
    if n == 0:
        return 0.0, 1.0
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return max(0.0, mean - z * stderr), min(1.0, mean + z * stderr)


@dataclass
class PMEvalResult:
    n: int  # comparisons (each judged in both orders)
    accuracy: float  # mean over comparisons of the two orders' correctness (0, 0.5 or 1 each)
    accuracy_ci: tuple[float, float]
    accuracy_original: float
    accuracy_original_ci: tuple[float, float]
    accuracy_swapped: float
    accuracy_swapped_ci: tuple[float, float]
    frac_A: float  # share of the 2n verdicts that are "A" (0.5 = no position bias)
    frac_other: float  # share of the 2n greedy answers that are neither "A" nor "B"
    order_agreement: float  # share of comparisons where both orders pick the same completion
    mean_p_correct: float  # mean P(correct label | {A, B}) over the 2n judgements (A/B labels only)
    accuracy_symmetric: float  # the order-symmetric judge (both orders' probabilities combined) picks the label
    accuracy_symmetric_ci: tuple[float, float]
    frac_longer_picked: float  # share of the 2n A/B verdicts (on replies of different lengths) for the longer one
    frac_longer_preferred: float  # share of the n comparisons (different lengths) whose preferred reply is longer

    def metrics(self, prefix: str = "pm") -> dict[str, float]:
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/accuracy_ci_low": self.accuracy_ci[0],
            f"{prefix}/accuracy_ci_high": self.accuracy_ci[1],
            f"{prefix}/accuracy_original": self.accuracy_original,
            f"{prefix}/accuracy_swapped": self.accuracy_swapped,
            f"{prefix}/frac_A": self.frac_A,
            f"{prefix}/frac_other": self.frac_other,
            f"{prefix}/order_agreement": self.order_agreement,
            f"{prefix}/mean_p_correct": self.mean_p_correct,
            f"{prefix}/n": float(self.n),
            f"{prefix}/accuracy_symmetric": self.accuracy_symmetric,
            f"{prefix}/accuracy_symmetric_ci_low": self.accuracy_symmetric_ci[0],
            f"{prefix}/accuracy_symmetric_ci_high": self.accuracy_symmetric_ci[1],
            f"{prefix}/frac_longer_picked": self.frac_longer_picked,
            f"{prefix}/frac_longer_preferred": self.frac_longer_preferred,
        }


async def judge_both_orders(
    preference_model: PreferenceModelFromChatRenderer, comparisons: Sequence[LabeledComparison], chunk_size: int = 256
) -> tuple[list[Judgement], list[Judgement]]:
    """The judgements of every comparison as given and swapped, in batched passes of `chunk_size` prompts."""
    n = len(comparisons)
    if n == 0:
        raise ValueError("no comparisons to evaluate the preference model on")
    to_judge = [c.comparison for c in [*comparisons, *(c.swap() for c in comparisons)]]
    judgements = []
    with tqdm(
        total=len(to_judge),
        desc="judging held-out comparisons",
        unit="cmp",
        leave=False,
        disable=len(to_judge) <= chunk_size,
    ) as progress:
        for start in range(0, len(to_judge), chunk_size):  # each chunk is one batched scoring pass
            judgements += await preference_model.judge_many(to_judge[start : start + chunk_size])
            progress.update(min(chunk_size, len(to_judge) - start))
    return judgements[:n], judgements[n:]


def summarize_judgements(
    comparisons: Sequence[LabeledComparison], original: Sequence[Judgement], flipped: Sequence[Judgement]
) -> PMEvalResult:
    """Accuracy (both orders), position bias, order agreement and P(correct) from judge_both_orders' output."""
    n = len(comparisons)
    swapped = [c.swap() for c in comparisons]
    judgements = [*original, *flipped]
    correct_original = [j.verdict == VERDICT_OF_LABEL[c.label] for j, c in zip(original, comparisons)]
    correct_swapped = [j.verdict == VERDICT_OF_LABEL[c.label] for j, c in zip(flipped, swapped)]
    per_comparison = [(a + b) / 2 for a, b in zip(correct_original, correct_swapped)]
    agree = [a.verdict != 0 and a.verdict == -b.verdict for a, b in zip(original, flipped)]
    p_correct = [
        j.p_b if c.label == "B" else 1.0 - j.p_b
        for j, c in zip(judgements, [*comparisons, *swapped])
        if c.label != "Tie"
    ]
    decided = [c for c in comparisons if c.label != "Tie"]
    symmetric_correct = [
        _symmetric_credit(symmetric_p_b(a, b), c.label)
        for a, b, c in zip(original, flipped, comparisons)
        if c.label != "Tie"
    ]
    longer_picked = [_picks_longer(j.verdict, c.comparison) for j, c in zip(judgements, [*comparisons, *swapped])]
    longer_preferred = [_picks_longer(VERDICT_OF_LABEL[c.label], c.comparison) for c in comparisons]
    return PMEvalResult(
        accuracy_symmetric=sum(symmetric_correct) / len(decided) if decided else float("nan"),
        accuracy_symmetric_ci=wilson_interval(sum(symmetric_correct), len(decided)),
        frac_longer_picked=_share(longer_picked),
        frac_longer_preferred=_share(longer_preferred),
        n=n,
        accuracy=sum(per_comparison) / n,
        accuracy_ci=normal_interval(per_comparison),
        accuracy_original=sum(correct_original) / n,
        accuracy_original_ci=wilson_interval(sum(correct_original), n),
        accuracy_swapped=sum(correct_swapped) / n,
        accuracy_swapped_ci=wilson_interval(sum(correct_swapped), n),
        frac_A=sum(j.verdict == -1.0 for j in judgements) / (2 * n),
        frac_other=sum(j.greedy_text not in ("A", "B") for j in judgements) / (2 * n),
        order_agreement=sum(agree) / n,
        mean_p_correct=sum(p_correct) / len(p_correct) if p_correct else float("nan"),
    )


def _symmetric_credit(p_b: float, label: str) -> float:
    """1 when the order-symmetric P(B) is on the label's side, 0 when on the other, 0.5 when undecided (a judge
    that only looks at position lands exactly on 0.5)."""
    if abs(p_b - 0.5) < 1e-6:
        return 0.5
    return float((p_b > 0.5) == (label == "B"))


def _reply_length(messages: Sequence[Any]) -> int:
    return sum(len(get_text_content(m)) for m in messages)


def _picks_longer(verdict: float, comparison: Comparison) -> bool | None:
    """Whether an A/B verdict picks the longer reply (None: a tie, another answer, or equal lengths)."""
    length_a, length_b = _reply_length(comparison.completion_A), _reply_length(comparison.completion_B)
    if verdict == 0 or length_a == length_b:
        return None
    return (verdict > 0) == (length_b > length_a)


def _share(flags: Sequence[bool | None]) -> float:
    counted = [f for f in flags if f is not None]
    return sum(counted) / len(counted) if counted else float("nan")


async def evaluate_preference_model(
    preference_model: PreferenceModelFromChatRenderer, comparisons: Sequence[LabeledComparison], chunk_size: int = 256
) -> PMEvalResult:
    """Judge every comparison as given and swapped, in batched passes of `chunk_size` prompts."""
    original, flipped = await judge_both_orders(preference_model, comparisons, chunk_size)
    return summarize_judgements(comparisons, original, flipped)


def format_pm_eval(result: PMEvalResult) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def ci(interval: tuple[float, float]) -> str:
        return f"[{pct(interval[0])}, {pct(interval[1])}]"

    return "\n".join(
        [
            f"preference model on {result.n} held-out comparisons (each judged in both A/B orders):",
            f"  accuracy           {pct(result.accuracy)}  95% CI {ci(result.accuracy_ci)}",
            f"    original order   {pct(result.accuracy_original)}  95% CI {ci(result.accuracy_original_ci)}",
            f"    swapped order    {pct(result.accuracy_swapped)}  95% CI {ci(result.accuracy_swapped_ci)}",
            f"  verdicts 'A'       {pct(result.frac_A)}  (50% = no position bias)",
            f"  neither A nor B    {pct(result.frac_other)}  (greedy answer is another token)",
            f"  order agreement    {pct(result.order_agreement)}  (same completion picked in both orders)",
            f"  mean P(correct)    {result.mean_p_correct:.3f}",
            f"  order-symmetric    {pct(result.accuracy_symmetric)}  95% CI {ci(result.accuracy_symmetric_ci)}  (both orders'"
            f" probabilities combined)",
            f"  picks the longer   {pct(result.frac_longer_picked)}  (people preferred the longer reply "
            f"{pct(result.frac_longer_preferred)} of the time)",
        ]
    )


def print_pm_eval(result: PMEvalResult) -> None:
    print(format_pm_eval(result))


class PreferenceModelEvaluator(SamplingClientEvaluator):
    """Evaluates the sampling client's weights as a preference model on held-out labelled comparisons."""

    def __init__(self, comparisons: Sequence[LabeledComparison], renderer_name: str, model_name: str):
        self.comparisons = list(comparisons)
        self.renderer_name = renderer_name
        self.model_name = model_name

    async def __call__(self, sampling_client: SamplingClient) -> dict[str, float]:
        renderer = get_renderer(self.renderer_name, get_tokenizer(self.model_name))
        preference_model = PreferenceModelFromChatRenderer(renderer, sampling_client)
        return (await evaluate_preference_model(preference_model, self.comparisons)).metrics()
