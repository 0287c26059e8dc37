"""Subcommands of the ``semrecon`` command line that do not belong to a single package area."""
