"""The `mesh` command: one entry point dispatching to node, entry and key subcommands."""
