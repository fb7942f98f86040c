"""``python -m minicaffe <command> ...``: the ``minicaffe`` command, for when the console script is not
on PATH (a venv that is not activated) or another ``minicaffe`` shadows it."""
import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
