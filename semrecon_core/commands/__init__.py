"""Every subcommand of the ``semrecon`` command line (argparse and its glue only); the entry point is ``main``."""
