"""`make run`: a server and an agent on a local data directory, with a demo workload entry."""

from __future__ import annotations

import sys


def main() -> int:
    print("make run: the server and agent are not built yet (issues 3 and 4).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
