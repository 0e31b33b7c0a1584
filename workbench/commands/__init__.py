"""One module per CLI command. Each exposes ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; :mod:`workbench.cli` lists them in :data:`COMMANDS`."""
