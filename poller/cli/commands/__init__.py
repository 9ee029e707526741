"""The `poller` commands, one module per family; poller.cli.main puts them on the group.

- cycle: `once`, `run` (the daemon) and `check` (one organization)
- orgs: `status`, `forecast` and `configure` (an organization's alert settings)
- emails: `preview` and `send-test`
- ops: `health`, `requeue`, `db upgrade` and `simulate`
"""
