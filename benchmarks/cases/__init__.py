"""Benchmark case modules: every ``<name>.py`` here exposes ``cases(quick, device)``.

See ``benchmarks/README.md`` for the contract."""
