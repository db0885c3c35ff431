"""The command line: `metrics-gateway <command>`, also `python -m app <command>`.

Commands:
  doctor   check every catalog figure against a live Prometheus and say why one
           cannot work (exit 1 when a figure is broken; see app/gateway/doctor.py).

Settings come from the environment like the server's (PROMETHEUS_URL,
CATALOG_PATH, credentials...), read once here; flags override them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from app.gateway import doctor
from app.gateway.settings import GatewaySettings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metrics-gateway", description="metrics-gateway tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "doctor", help="check each catalog figure against a live Prometheus",
        description="Per figure: does it parse, do the metric families it reads exist upstream, do their "
                    "types fit how the query uses them, does it return data now. Exit 0 when no figure is "
                    "broken, 1 when one is, 2 when the check could not run.")
    doctor.add_arguments(check)
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {}
    if args.prometheus_url:
        overrides["prometheus_url"] = args.prometheus_url
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        print(f"metrics-gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    return doctor.run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
