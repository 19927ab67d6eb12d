"""The demo: synthetic signals fed to a local InfluxDB."""
