"""One exception family, so the command line can print a single clean line for anything a user caused.

Every error carries where it happened (a file with line:col, a layer, a record key) in its message;
the CLI prints ``error: <message>`` and exits non-zero instead of showing a traceback.
"""


class MinicaffeError(Exception):
    """Base of every error a user's input can cause."""


class ParseError(MinicaffeError):
    """A text or binary file that does not parse; names ``file:line:col`` where known."""

    def __init__(self, message, path=None, line=None, col=None):
        self.path, self.line, self.col = path, line, col
        where = str(path) if path else "<string>"
        if line is not None:
            where += f":{line}"
            if col is not None:
                where += f":{col}"
        super().__init__(f"{where}: {message}")


class NetError(MinicaffeError):
    """A net that cannot be built or run: names the layer (and its type) at fault."""

    def __init__(self, message, layer=None, layer_type=None):
        self.layer, self.layer_type = layer, layer_type
        if layer is not None:
            kind = f" ({layer_type})" if layer_type else ""
            message = f"layer '{layer}'{kind}: {message}"
        super().__init__(message)


class ShapeError(NetError):
    """Blob shapes that do not fit together."""


class AllocationError(NetError):
    """A blob too large to allocate: names the blob, the bytes asked for and (once the net adds it)
    the layer, instead of a MemoryError traceback."""


class WeightsError(MinicaffeError):
    """A weights file that does not match the net (names the file and the layer)."""


class DataError(MinicaffeError):
    """A database, record, image or list file that cannot be used (names the file and key/line)."""


class SolverError(MinicaffeError):
    """A solver definition or state that cannot be used."""


class NumericalError(MinicaffeError):
    """A NaN or infinity appeared in training (names the iteration and the layer)."""


def did_you_mean(word, choices):
    """``" (did you mean 'x'?)"`` for the choice closest to a misspelt ``word``, or ``""``: the hint
    every one-line error about an unknown name (a flag, an lr_policy, a blob) ends with."""
    import difflib
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
