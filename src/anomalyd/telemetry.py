"""Prometheus metrics of the daemon (prometheus_client), shared by the modules that update them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TICKS = Counter("anomalyd_ticks", "Ticks run, by outcome", ["outcome"], registry=REGISTRY)
TICK_SECONDS = Histogram("anomalyd_tick_duration_seconds", "Wall time of one tick", registry=REGISTRY,
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
WINDOWS = Counter("anomalyd_windows", "Windows processed, by result (scored, anomalous, missing)",
                  ["signal", "result"], registry=REGISTRY)
LAG_SECONDS = Gauge("anomalyd_lag_seconds", "Age of the oldest watermark behind now, per signal", ["signal"],
                    registry=REGISTRY)
INFLUX_ERRORS = Counter("anomalyd_influxdb_errors", "Failed InfluxDB requests, by operation", ["op"],
                        registry=REGISTRY)
UNTRAINED_SERIES = Gauge("anomalyd_untrained_series", "Series seen without a model, per signal", ["signal"],
                         registry=REGISTRY)
FIELD_REBASELINES = Counter("anomalyd_field_rebaselines", "A field of a multi-field signal accepted a sustained level "
                            "shift as its new normal (rebaseline_after)", ["signal", "field"], registry=REGISTRY)
DATA_PROBLEMS = Counter("anomalyd_data_problems", "Samples repaired or dropped, by kind", ["signal", "kind"],
                        registry=REGISTRY)
ALERTS = Counter("anomalyd_alerts", "Alert deliveries, by sink and outcome (sent, failed)",
                 ["sink", "outcome"], registry=REGISTRY)
ALERTS_QUEUED = Gauge("anomalyd_alerts_queued", "Alerts waiting in the outbox", registry=REGISTRY)
LAST_SUCCESS = Gauge("anomalyd_last_success_timestamp_seconds", "Unix time of the last successful tick",
                     registry=REGISTRY)
REFITS = Counter("anomalyd_refits", "Scheduled refits on recent normal data, by outcome (ok, failed)", ["outcome"],
                 registry=REGISTRY)
UNSCORED_SERIES = Gauge("anomalyd_unscored_series", "Series not being scored, per signal and reason (no_model, "
                        "mismatch, no_data)", ["signal", "reason"], registry=REGISTRY)
SIGNAL_FAILED = Gauge("anomalyd_signal_failed", "1 when the signal's last tick failed (its windows are scored "
                      "again next tick)", ["signal"], registry=REGISTRY)
SHARD_CONFLICT = Gauge("anomalyd_shard_conflict", "1 while another replica writes statistics for this replica's "
                       "shard (two replicas configured with the same index score the same series)",
                       registry=REGISTRY)
