"""The ``mmproxy`` command.

  mmproxy --config node1.toml        run one node's proxy
  mmproxy check-config node1.toml    validate a configuration file and exit
  mmproxy init-cluster --config F    set this node's PostgreSQL up for the cluster
  mmproxy demo [--nodes N] [--dir D] start a local cluster of real PostgreSQL
                                     servers with a proxy in front of each
"""
from __future__ import annotations

import argparse
import sys

from config import ConfigError, load_config

EPILOG = """\
examples:
  mmproxy --config deploy/node1.toml
  mmproxy check-config deploy/node1.toml
  mmproxy demo --nodes 3 --dir /tmp/mmproxy-demo

Exit status: 0 on a clean stop, 1 on an unusable configuration or a
failure to start, 2 on a usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmproxy",
        description="mmproxy: a multi-master PostgreSQL cluster built as a transparent "
                    "wire-protocol proxy in front of each PostgreSQL node.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="run the proxy of the node this TOML file describes "
                        "(see docs/configuration.md)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check-config", help="validate a configuration file and print it",
                       description="Load and validate a node configuration file; print "
                                   "the effective settings, or the first error.")
    c.add_argument("file", help="path of the TOML file")

    i = sub.add_parser(
        "init-cluster", help="set this node's PostgreSQL up for the cluster",
        description="Check this node's PostgreSQL settings (wal_level, "
                    "max_prepared_transactions, max_replication_slots, max_wal_senders) and "
                    "create what replication needs: schema mtm, publication mtm_pub, a "
                    "logical slot and a replication origin per peer, and the safety nets. "
                    "Run it once on every node; running it again is harmless. Running "
                    "proxies switch to cluster mode within a second.")
    i.add_argument("--config", required=True, metavar="FILE", help="this node's configuration")

    d = sub.add_parser(
        "demo", help="start a local cluster on real PostgreSQL servers",
        description="Create a local cluster under one directory: N PostgreSQL 15 "
                    "servers (initdb, configured for logical decoding and prepared "
                    "transactions) and one mmproxy in front of each. Prints how to "
                    "connect, and stops everything cleanly on Ctrl-C or SIGTERM.")
    d.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    d.add_argument("--dir", default="/tmp/mmproxy-demo",
                   help="directory for data, sockets, configs and logs "
                        "(default /tmp/mmproxy-demo; emptied first)")
    d.add_argument("--port", type=int, default=6430,
                   help="base port: proxy i listens on PORT+i, its PostgreSQL on "
                        "PORT+100+i (default 6430)")
    d.add_argument("--keep", action="store_true",
                   help="keep the directory after stopping (default: remove it)")
    d.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _load(path: str):
    """The configuration, or None after telling the user what is wrong."""
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"mmproxy: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check-config":
        cfg = _load(args.file)
        if cfg is None:
            return 1
        print(f"{args.file}: OK")
        print(cfg)
        return 0
    if args.command == "init-cluster":
        cfg = _load(args.config)
        if cfg is None:
            return 1
        import asyncio

        from replication.cluster import init_local_node
        try:
            problems = asyncio.run(init_local_node(cfg))
        except Exception as e:  # psycopg.OperationalError and friends
            print(f"mmproxy init-cluster: {e}", file=sys.stderr)
            return 1
        if problems:
            print(f"mmproxy init-cluster: node {cfg.node.id} is not ready:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            return 1
        print(f"node {cfg.node.id}: initialized for a cluster of nodes "
              f"{sorted([cfg.node.id] + [p.id for p in cfg.peers])}")
        return 0
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(nodes=args.nodes, base_dir=args.dir, base_port=args.port,
                        keep=args.keep, log_level=args.log_level)
    if not args.config:
        parser.print_help(sys.stderr)
        return 2
    cfg = _load(args.config)
    if cfg is None:
        return 1
    from .server import run
    try:
        run(cfg)
    except OSError as e:
        print(f"mmproxy: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
