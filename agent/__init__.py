"""The host agent: pipeline, process table, attribution, detection, alerts, channel, actions."""
