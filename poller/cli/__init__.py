"""The `poller` command line: commands, their presentation, logs, metrics."""
