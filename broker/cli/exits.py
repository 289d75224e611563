"""The ``broker`` command's exit codes (docs/operations.md). No imports: the entry point reads them before it knows
whether the server's dependencies are installed."""

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and found something wrong (nothing matched, something missing or unrepaired)
EXIT_USAGE = 2
EXIT_CONFIG = 3  # bad settings, or the server extra is not installed
EXIT_UNAVAILABLE = 4  # Redis or the broker could not be reached
