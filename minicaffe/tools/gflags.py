"""gflags-style command lines for the tools that keep Caffe's C++ flags (convert_imageset,
compute_image_mean), so shell scripts written for Caffe's binaries run unchanged."""
import sys

from .argparsing import UsageError, unknown_flag_message


class HelpRequested(Exception):
    pass


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def parse_gflags(argv, spec, prog="minicaffe"):
    """Parse ``argv`` as gflags does: ``--name=value``, ``--name value``, ``-name`` too, booleans as
    ``--name``, ``--name=true|false`` or ``--noname``; ``--`` ends the flags. ``spec`` maps a flag
    name to (type, default, help). Returns (values dict, positional list)."""
    values = {name: default for name, (_, default, _) in spec.items()}
    positional = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-" or _is_number(arg):
            positional.append(arg)
            continue
        body = arg.lstrip("-")
        name, has_value, value = body.partition("=")[0], "=" in body, body.partition("=")[2]
        if name in ("help", "h", "helpfull"):
            raise HelpRequested()
        if name not in spec and name.startswith("no") and name[2:] in spec and spec[name[2:]][0] is bool \
                and not has_value:
            values[name[2:]] = False
            continue
        if name not in spec:
            raise UsageError(unknown_flag_message(prog, "--" + name, ["--" + n for n in spec]))
        kind = spec[name][0]
        if kind is bool:
            if not has_value:
                values[name] = True
            elif value.lower() in _TRUE:
                values[name] = True
            elif value.lower() in _FALSE:
                values[name] = False
            else:
                raise UsageError(f"flag --{name}: '{value}' is not a boolean (true/false)")
            continue
        if not has_value:
            if i >= len(argv):
                raise UsageError(f"flag --{name} needs a value")
            value = argv[i]
            i += 1
        if kind is int:
            try:
                value = int(value)
            except ValueError:
                raise UsageError(f"flag --{name}: '{value}' is not an integer") from None
        values[name] = value
    return values, positional


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_flags(spec):
    lines = ["Flags:"]
    for name, (kind, default, text) in spec.items():
        shown = str(default).lower() if kind is bool else repr(default) if kind is str else default
        lines.append(f"  --{name} ({text}) type: {kind.__name__} default: {shown}")
    return "\n".join(lines)


def parse_command(argv, spec, usage, nargs):
    """Flags and positional arguments of a tool's command line, or the exit status when there is
    nothing to run: 0 after printing the help, 1 (usage on stderr) when the number of positional
    arguments is not in ``nargs`` (a range)."""
    # the tool's name: the first word of the usage line (``    convert_imageset [FLAGS] ...``)
    prog = next((line.split()[0] for line in usage.splitlines() if "[FLAGS]" in line), "minicaffe")
    try:
        flags, args = parse_gflags(argv, spec, prog)
    except HelpRequested:
        print(usage + "\n" + format_flags(spec))
        return 0
    if len(args) not in nargs:
        print(usage + "\n" + format_flags(spec), file=sys.stderr)
        return 1
    return flags, args
