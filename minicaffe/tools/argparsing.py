"""The argument parser every command shares, so a mistyped flag reads the same everywhere.

``argparse`` on its own answers a wrong flag with the whole usage (a dozen lines, the actual complaint
last) and exit status 2, while every other error of these tools is one ``error: ...`` line and status
1. ``ArgumentParser`` here raises ``UsageError`` instead, which ``run_main`` prints as that one line:
``error: unknown flag --solverr (did you mean --solver?); see 'minicaffe train --help'``. The gflags-style tools
(convert_imageset, compute_image_mean) give the same line through ``gflags.parse_gflags``.
"""
import argparse

from ..errors import MinicaffeError, did_you_mean


class UsageError(MinicaffeError):
    """A command line that does not parse (``run_main`` prints it on one line, exit status 1)."""


def unknown_flag_message(prog, flag, known):
    """``unknown flag --x (did you mean --y?); see 'prog --help'`` for a flag not in ``known`` (option strings)."""
    name = flag.split("=", 1)[0]
    longs = [k for k in known if k.startswith("--")]
    hint = did_you_mean(name, longs) if name.startswith("--") else did_you_mean("-" + name, longs)
    hint = hint.replace("'", "")
    return f"unknown flag {name}{hint}; see '{prog} --help'"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``UsageError``), not usage + exit 2.

    Abbreviated flags are refused (``allow_abbrev=False``), as gflags and Caffe's tools refuse them:
    ``--iteration=3`` silently taken as ``--iterations`` would hide a typo that one day meets a second
    flag of that prefix."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [a for a in extras if a.startswith("-") and a != "-"]
            if flags:
                raise UsageError(unknown_flag_message(self.prog, flags[0], self._option_string_actions))
            raise UsageError(f"{self.prog}: unexpected argument '{extras[0]}'; see '{self.prog} --help'")
        return args

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")

    def print_help(self, file=None):
        """Flushed here, so a reader that closed the pipe (``--help | head -1``) raises the
        BrokenPipeError inside ``run_main``, which exits quietly, not in the interpreter's last flush."""
        super().print_help(file)
        (file or __import__("sys").stdout).flush()
