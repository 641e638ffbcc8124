"""Reproducible benchmarks of qanafed components; each writes bench/results/<name>.json."""
