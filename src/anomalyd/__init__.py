"""anomalyd: finds anomalous windows in InfluxDB time series with a K-Means catalog of normal shapes."""

__version__ = "0.1.0"
