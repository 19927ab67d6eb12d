"""Where samples live: the store interface and the InfluxDB 1.x/2.x adapters."""
