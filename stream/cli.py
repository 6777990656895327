"""``rfm-stream`` command line: ``worker``, ``demo``, ``schemas``.

``rfm-stream worker [faust worker options]`` runs the faust worker configured by ``RFM_*``
environment variables (README "Configuration").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "worker":
        from stream.app import app, settings

        sys.argv = ["rfm-stream", "worker", "--loglevel", "info",
                    "--web-bind", settings.web_bind, "--web-port", str(settings.web_port),
                    *args[1:]]
        app.main()
        return 0
    parser = argparse.ArgumentParser(
        prog="rfm-stream", description="Real-time RFM customer segmentation.",
        epilog="examples:\n  rfm-stream demo\n  RFM_KAFKA_URL=kafka://127.0.0.1:9092 "
               "RFM_REDIS_URL=redis://127.0.0.1:6379/0 rfm-stream worker\n"
               "  rfm-stream schemas docs/schemas",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run the faust worker (options after it go to faust)")
    demo = sub.add_parser("demo", help="CDNOW end to end on the embedded local stack")
    demo.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    schemas = sub.add_parser("schemas", help="write the events' JSON Schemas")
    schemas.add_argument("directory", nargs="?", default="docs/schemas")
    ns = parser.parse_args(args)
    if ns.command == "demo":
        from stream import demo as demo_mod

        return demo_mod.main(ns.out)
    if ns.command == "schemas":
        from stream.events import write_schemas

        for p in write_schemas(Path(ns.directory)):
            print(p)
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
