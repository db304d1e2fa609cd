"""``python -m mpcapi.config [twistd mpcapi options]``: check the configuration, start nothing.

Reads every source as ``twistd -n mpcapi`` would, with the same options, and exits 0 when the
daemon would accept it, or 2 with the daemon's own one-line message; scripts/run asks this before
it spends seconds starting a LiteLLM for a daemon that would refuse to start.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from mpcapi.config.settings import ConfigError
from mpcapi.tap import Options, read_settings


def main(argv: list[str]) -> int:
    """0 when the configuration given by ``argv`` and the other sources is usable, else 2."""
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as error:
        sys.stderr.write(f"mpcapi: {error}\n")
        return 2
    try:
        read_settings(options)
    except ConfigError as error:
        sys.stderr.write(f"mpcapi: configuration error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
