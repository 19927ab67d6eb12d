"""Alerts: the policy (policy), the messages (messages) and their plot (plots), the durable outbox (outbox), the
sinks (sinks: log; slack: Slack), the manager tying them together (manager), and the Kapacitor TICKscripts
(kapacitor, tickscripts/)."""
