"""Sections of the benchmark suite run by ``bench/run_all.py`` (see bench/README.md)."""
