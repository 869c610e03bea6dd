"""The `driftwarden` command line: one parser that dispatches to each role's commands."""
