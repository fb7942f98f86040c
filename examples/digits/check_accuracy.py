"""Read the final 'accuracy = X' line of a `minicaffe test` log and fail if it is below --min."""
import argparse
import re
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("log")
    parser.add_argument("--min", type=float, default=0.97)
    args = parser.parse_args(argv)
    found = re.findall(r"\]\s*accuracy = ([0-9.eE+-]+)\s*$", open(args.log).read(), re.M)
    if not found:
        print(f"error: {args.log}: no final 'accuracy = X' line", file=sys.stderr)
        return 1
    acc = float(found[-1])
    verdict = "ok" if acc >= args.min else "FAILED"
    print(f"held-out accuracy {acc:.4f} (target >= {args.min}): {verdict}")
    return 0 if acc >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
