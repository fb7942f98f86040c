"""Command entry points: one module a command, each a thin shell over library functions."""
