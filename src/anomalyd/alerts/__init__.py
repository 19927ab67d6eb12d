"""Alerts: policy, outbox, Slack, and the Kapacitor TICKscripts."""
