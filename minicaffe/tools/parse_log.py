"""Caffe's tools/extra/parse_log.py: a training log → ``<log>.train`` and ``<log>.test`` CSV tables.

Reads Caffe's glog lines and minicaffe's (same prefix, same wording)::

    I0901 12:00:00.000000  1234 solver.cpp:228] Iteration 100 (9.8 iter/s, 10.2s/100 iters), loss = 0.5
    I0901 12:00:00.000100  1234 solver.cpp:244]     Train net output #0: loss = 0.5 (* 1 = 0.5 loss)
    I0901 12:00:00.000200  1234 sgd_solver.cpp:106] Iteration 100, lr = 0.01
    I0901 12:00:01.000000  1234 solver.cpp:337] Iteration 500, Testing net (#0)
    I0901 12:00:02.000000  1234 solver.cpp:404]     Test net output #0: accuracy = 0.91

Columns: NumIters, Seconds, LearningRate, then each net output by name in order of appearance.
Seconds count from the "Solving ..." line (Caffe's start time; the first time-stamped line when
there is none). glog stamps have no year: it comes from glog's "Log file created at: YYYY/MM/DD"
header, or else the year of the file's last modification is taken as that of its last line; each
month that goes backwards (December → January) is one more year. So runs over New Year and leap
days come out right (Caffe's script uses the file's ctime year for the first line).

Two deliberate differences from Caffe's script, both fixing wrong numbers it produces:
* LearningRate is the rate the solver logs for the row's own iteration, lr(NumIters), so a step
  in the schedule shows at its iteration (Caffe prints the rate just after the outputs, so its
  script gives each row the rate of the previous display); rows whose iteration has no rate line
  keep the latest rate logged before them.
* A last row that never filled up (e.g. a log with a single test pass) is kept, not dropped.
"""
from __future__ import annotations

import csv
import datetime
import io
import math
import os
import re
import sys
from typing import Sequence

from ..errors import DataError
from ..fileio import atomic_write
from .argparsing import ArgumentParser
from .common import run_main

_GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?\s+\S+\s+[^\]\s]*\]\s?(.*)$")
_CREATED = re.compile(r"^Log file created at: (\d{4})/(\d\d)/(\d\d) ")     # glog's file header
_ITERATION = re.compile(r"Iteration (\d+)")
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([-+]?(?:nan|inf)|[-+.\deE]+)", re.I)
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([-+]?(?:nan|inf)|[-+.\deE]+)", re.I)
_LEARNING_RATE = re.compile(r"\blr = ([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")

COLUMNS = ("NumIters", "Seconds", "LearningRate")


class _Stamp:
    """A glog time stamp without its year: years after the first line, month, day, time of day."""
    __slots__ = ("years", "month", "day", "hour", "minute", "second", "usec")

    def __init__(self, years, month, day, hour, minute, second, usec):
        self.years, self.month, self.day = years, month, day
        self.hour, self.minute, self.second, self.usec = hour, minute, second, usec

    def to_datetime(self, first_year):
        return datetime.datetime(first_year + self.years, self.month, self.day, self.hour, self.minute,
                                 self.second, self.usec)


def _float(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Parse a Caffe/minicaffe training log; returns ``(train_rows, test_rows)``, lists of dicts.

    Each row maps NumIters (int), Seconds and LearningRate (floats, NaN when unknown) and every
    net output name to a float, in Caffe's column order.
    """
    path = os.fspath(path)
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        try:
            train, test, stamps = _parse_lines(f)
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    _fill_seconds(path, train + test, stamps)
    for rows in (train, test):
        if len(rows) > 1 and math.isnan(rows[0]["LearningRate"]):
            rows[0]["LearningRate"] = rows[1]["LearningRate"]   # as Caffe's fix_initial_nan_learning_rate
    return train, test


def _parse_lines(lines):
    iteration = -1
    learning_rate = math.nan
    tables = {"train": ([], [None]), "test": ([], [None])}
    stamps = {"first": None, "solving": None, "created": None}
    years, last_month = 0, None
    for line in lines:
        if stamps["first"] is not None and not ("Iteration" in line or "net output #" in line
                                                or "lr = " in line or "Solving" in line):
            continue                           # most lines: nothing to read
        m = _GLOG.match(line.rstrip("\r\n"))
        stamp = None
        if m:
            month, day, hour, minute, second, frac, message = m.groups()
            month, day, hour, minute, second = int(month), int(day), int(hour), int(minute), int(second)
            if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 62):
                m = None                       # not a time stamp after all
        if m:
            if last_month is not None and month < last_month:
                years += 1
            last_month = month
            stamp = _Stamp(years, month, day, hour, minute, min(second, 59), int((frac or "0").ljust(6, "0")))
            if stamps["first"] is None:
                stamps["first"] = stamp
            if stamps["solving"] is None and "Solving" in message:
                stamps["solving"] = stamp
        else:
            message = line
            if stamps["first"] is None and stamps["created"] is None:
                created = _CREATED.match(line)
                if created:
                    stamps["created"] = tuple(int(g) for g in created.groups())
        it = _ITERATION.search(message)
        if it:
            iteration = int(it.group(1))
        if iteration == -1:
            continue                           # nothing counts before the first iteration
        lr = _LEARNING_RATE.search(message)
        if lr:
            learning_rate = float(lr.group(1))
            for rows, pending in tables.values():
                # the rate printed for an iteration belongs to that iteration's rows
                for row in (pending[0], rows[-1] if rows else None):
                    if row is not None and row["NumIters"] == iteration:
                        row["LearningRate"] = learning_rate
        for key, regex in (("train", _TRAIN_OUTPUT), ("test", _TEST_OUTPUT)):
            rows, pending = tables[key]
            out = regex.search(message)
            if out:
                row = pending[0]
                if row is None or row["NumIters"] != iteration:
                    if row is not None:
                        rows.append(row)
                    row = {"NumIters": iteration, "Seconds": stamp, "LearningRate": learning_rate}
                    pending[0] = row
                row[out.group(2)] = _float(out.group(3))
            row = pending[0]
            if row is not None and rows and len(row) == len(rows[0]):
                rows.append(row)               # complete: as many columns as the first row
                pending[0] = None
    result = []
    for rows, pending in tables.values():
        if pending[0] is not None:
            rows.append(pending[0])
        result.append(rows)
    stamps["years"] = years
    return result[0], result[1], stamps


def _fill_seconds(path, rows, stamps):
    """Turn each row's stamp into seconds since the start, choosing years as the module doc says."""
    start = stamps["solving"] or stamps["first"]
    if start is None:
        for row in rows:
            row["Seconds"] = math.nan
        return
    first = stamps["first"]
    if stamps["created"] is not None:
        # glog's header has the year the file was opened, just before its first line
        year, month, day = stamps["created"]
        first_year = year + 1 if (first.month, first.day) < (month, day) else year
    else:
        first_year = _year_from_mtime(path, rows, start, stamps["years"])
    t0 = _datetime_or_none(start, first_year)
    for row in rows:
        dt = None if row["Seconds"] is None or t0 is None else _datetime_or_none(row["Seconds"], first_year)
        row["Seconds"] = math.nan if dt is None else (dt - t0).total_seconds()


def _year_from_mtime(path, rows, start, years):
    """The year of the first line when only the file's modification time (its last line) says."""
    try:
        end_year = datetime.datetime.fromtimestamp(os.path.getmtime(path)).year
    except (OSError, ValueError, OverflowError):
        end_year = datetime.date.today().year
    stamped = [start] + [r["Seconds"] for r in rows if r["Seconds"] is not None]
    for shift in range(8):     # a 29 February needs a leap year: step back until every stamp exists
        try:
            for s in stamped:
                s.to_datetime(end_year - years - shift)
        except ValueError:
            continue
        return end_year - years - shift
    return end_year - years


def _datetime_or_none(stamp, first_year):
    try:
        return stamp.to_datetime(first_year)
    except ValueError:         # e.g. 30 February: no such day in any year
        return None


def columns_of(rows):
    """Caffe's columns first, then every output name in order of first appearance."""
    cols = list(COLUMNS)
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def to_csv(rows: Sequence[dict], delimiter: str = ",") -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns_of(rows), delimiter=delimiter, restval="",
                            lineterminator="\r\n")     # csv.excel's, as Caffe's script writes
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def save_csv_files(log_path: str | os.PathLike, output_dir: str | os.PathLike, train_rows: Sequence[dict],
                   test_rows: Sequence[dict], delimiter: str = ",", verbose: bool = False) -> list[str]:
    """Write ``<output_dir>/<basename>.train`` and ``.test`` (atomically); empty tables are skipped."""
    base = os.path.basename(os.fspath(log_path))
    written = []
    for suffix, rows in ((".train", train_rows), (".test", test_rows)):
        out = os.path.join(output_dir, base + suffix)
        if not rows:
            if verbose:
                print(f"Not writing {out}; no lines to write")
            continue
        atomic_write(out, to_csv(rows, delimiter))
        written.append(out)
        if verbose:
            print(f"Wrote {out}")
    return written


@run_main
def main(argv=None):
    parser = ArgumentParser(
        prog="parse_log",
        description="Parse a Caffe (or minicaffe) training log into two CSV files containing training "
                    "and testing information: OUTPUT_DIR/<log name>.train and .test.")
    parser.add_argument("logfile_path", help="path to the log file")
    parser.add_argument("output_dir", help="directory in which to place the output CSV files (created if missing)")
    parser.add_argument("--verbose", action="store_true", help="print some extra info (e.g., output file names)")
    parser.add_argument("--delimiter", default=",", help="column delimiter in the output files (default: ',')")
    args = parser.parse_args(argv)
    if args.delimiter == "\\t":                 # a shell-quoted '\t' means a tab
        args.delimiter = "\t"
    if len(args.delimiter) != 1:
        raise DataError(f"--delimiter must be one character, got {args.delimiter!r}")
    train, test = parse_log(args.logfile_path)
    if not train and not test:
        print(f"warning: {args.logfile_path}: no 'Train net output' or 'Test net output' lines found",
              file=sys.stderr)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise DataError(f"{args.output_dir}: not a directory")
    os.makedirs(args.output_dir, exist_ok=True)
    save_csv_files(args.logfile_path, args.output_dir, train, test, args.delimiter, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
