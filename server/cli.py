"""The svid-server command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("svid-server: not built yet (see issue 3)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
