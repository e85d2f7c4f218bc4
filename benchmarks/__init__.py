"""lvlm-fast microbenchmarks: harness, case modules, seed-style baselines."""
