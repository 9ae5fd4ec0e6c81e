"""Monitoring: a local Prometheus server, the rules and dashboard the chart ships, rendering of the dashboard."""
