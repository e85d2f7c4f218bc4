"""Seed-style baselines: each op written the way its released code does it
(see /work/shared/methods/). They are what ``speedup_vs_seed`` is measured against."""
