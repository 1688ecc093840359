"""The svid-agent command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("svid-agent: not built yet (see issue 4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
