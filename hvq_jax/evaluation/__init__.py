"""Evaluation: metrics, RD curves, baselines, BD-rate, the static-prior ablation, sweeps, plots."""
