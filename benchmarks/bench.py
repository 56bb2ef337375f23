"""`moelab bench` from a checkout: ``python benchmarks/bench.py --quick`` (same options)."""

import sys

from moelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
