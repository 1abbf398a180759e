"""Logs, Prometheus metrics and health endpoints shared by every process."""
