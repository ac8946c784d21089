"""Manage an index's versions: list, verify, publish, roll back, prune.

    python pipelines/index_versions.py list     --index indexes/market
    python pipelines/index_versions.py rollback --index indexes/market [--to VERSION]
    python pipelines/index_versions.py prune    --index indexes/market --keep 3
    python pipelines/index_versions.py verify   --index indexes/market [--version VERSION]
    python pipelines/index_versions.py publish  --index indexes/market --version VERSION
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001

import json

from pipelines._cli import make_parser, run_main


def parse_args(argv=None):
    p = make_parser(__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in [("list", "list complete versions (oldest first), marking CURRENT"),
                           ("rollback", "point CURRENT at an earlier version"),
                           ("prune", "delete old versions, never the CURRENT one"),
                           ("verify", "check the sha256 of every file of a version"),
                           ("publish", "point CURRENT at a complete version")]:
        s = sub.add_parser(name, help=helptext, description=helptext)
        s.add_argument("--index", required=True, help="ROOT/NAME")
        if name == "rollback":
            s.add_argument("--to", default=None, help="version to publish (default: the one before CURRENT)")
        if name == "prune":
            s.add_argument("--keep", type=int, required=True, help="number of newest versions to keep")
        if name in ("verify", "publish"):
            s.add_argument("--version", default=None, required=name == "publish",
                           help="version name" + (" (default: CURRENT)" if name == "verify" else ""))
        if name == "list":
            s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from index.ann.versions import IndexHome, IndexVersionError

    home = IndexHome(args.index)
    import os
    if not os.path.isdir(home.path):
        raise IndexVersionError(f"{args.index}: no such index directory")
    if args.command == "list":
        cur = home.current()
        rows = []
        for v in home.list_versions():
            m = home.manifest(v)
            rows.append({"version": v, "current": v == cur, "created_at": m.get("created_at"),
                         "index_type": m.get("index_type"), "num_vectors": m.get("num_vectors"),
                         "num_shards": m.get("num_shards"), "recall": (m.get("recall") or {})})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                rec = next((f"{k}={v:.4f}" for k, v in r["recall"].items() if k.startswith("recall@")), "")
                print(f"{'*' if r['current'] else ' '} {r['version']}  {r['created_at']}  {r['index_type']}"
                      f"  {r['num_vectors']} vectors  {r['num_shards']} shard(s)  {rec}")
    elif args.command == "rollback":
        print(f"CURRENT -> {home.rollback(args.to)}")
    elif args.command == "prune":
        deleted = home.prune(args.keep)
        print(f"deleted {len(deleted)} version(s)" + (": " + ", ".join(deleted) if deleted else ""))
    elif args.command == "verify":
        m = home.verify(args.version)
        print(f"ok: {m['version']} ({len(m['files'])} files)")
    elif args.command == "publish":
        home.publish(args.version)
        print(f"CURRENT -> {args.version}")
    return 0


if __name__ == "__main__":
    run_main(main)
