"""Subcommands of the ``legrad`` command line: one module each, registered in ``legrad.cli.SUBCOMMAND_MODULES``."""
