"""Analyses of raters and checkpoints: rater statistics, stages, stage matching, the candidate signal."""
