"""Stage 2: pairwise comparisons, their rendering, the preference model and its evaluation."""
