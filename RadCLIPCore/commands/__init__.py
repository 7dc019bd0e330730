"""The command layer: argument parsing, printing, progress bars and exit codes (no library module imports it)."""
