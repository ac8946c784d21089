"""Serve an index over HTTP (Ray Serve), following CURRENT.

    python pipelines/serve.py --index indexes/market --gallery-images data/Market-1501 [--port 8000]

Open http://127.0.0.1:8000/ and drop an image; or `curl --data-binary @photo.jpg
'http://127.0.0.1:8000/search?k=10'`. Routes: POST /search?k=K[&rerank=aqe] (image bytes or a
multipart file) -> JSON; GET / (the page); GET /images/<image_id> (gallery thumbnails from
--gallery-images); GET /healthz. When the nightly job publishes a new version, every replica
verifies it (sha256 of every file) and swaps to it between requests; a version that fails
verification is never loaded. Runs on the embedded Ray, or a cluster with --address/RAY_ADDRESS.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001


from pipelines._cli import add_log_arguments, add_ray_arguments, init_ray, make_parser, run_main


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--index", required=True, help="ROOT/NAME (follows its CURRENT file)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the search deployment (default 1)")
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="model directory (default: the one recorded with the index version; must match it)")
    p.add_argument("--gallery-images", default=None, metavar="ROOT_OR_SHARDS",
                   help="dataset root or shards directory of the gallery images (thumbnails on the page)")
    p.add_argument("--check-every", type=float, default=1.0,
                   help="seconds between checks of CURRENT (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (default 1)")
    add_ray_arguments(p)
    add_log_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replicas < 1 or args.threads < 1 or not 0 < args.check_every <= 3600:
        raise ValueError("--replicas and --threads must be >= 1, --check-every in (0, 3600]")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    # fail fast, in one line, before Ray starts: the index, its model and the image source
    from serving.engine import SearchEngine

    SearchEngine(args.index, args.model, verify=True).close()
    if args.gallery_images and not pathlib.Path(args.gallery_images).is_dir():
        raise FileNotFoundError(f"--gallery-images {args.gallery_images}: not a directory")
    init_ray(args.address, args.num_cpus)
    import time

    from serving.app import start

    start(args.index, args.host, args.port, model_dir=args.model, gallery_images=args.gallery_images,
          replicas=args.replicas, check_every=args.check_every, threads=args.threads)
    print(f"serving {args.index} on http://{args.host}:{args.port}/ ({args.replicas} replica(s)); "
          "Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    run_main(main)
