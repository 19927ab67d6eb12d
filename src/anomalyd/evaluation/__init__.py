"""Offline evaluation: metrics, NAB, datasets, the `anomalyd evaluate` command."""
