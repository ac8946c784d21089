"""Re-ranking options shared by query.py and evaluate.py (--rerank and its parameters)."""
from __future__ import annotations

METHODS_HELP = ("re-ranking: none, kreciprocal, aqe, alpha-qe, dba, diffusion, or a comma-separated "
                "combination (e.g. dba,alpha-qe,kreciprocal or dba,aqe,diffusion; applied as DBA, "
                "then QE, then k-reciprocal or diffusion)")


def add_rerank_arguments(p, repeatable: bool = False) -> None:
    """--rerank plus its parameters (defaults of index.rerank.kreciprocal.RerankConfig)."""
    if repeatable:
        p.add_argument("--rerank", action="append", default=None, metavar="METHODS",
                       help=METHODS_HELP + "; repeat to evaluate several (one report each)")
    else:
        p.add_argument("--rerank", default="none", metavar="METHODS", help=METHODS_HELP)
    g = p.add_argument_group("re-ranking parameters")
    g.add_argument("--k1", type=int, default=20, help="k-reciprocal: k1 (default 20)")
    g.add_argument("--k2", type=int, default=6, help="k-reciprocal: k2, local query expansion (default 6)")
    g.add_argument("--lambda-value", type=float, default=0.3,
                   help="k-reciprocal: weight of the original distance (default 0.3)")
    g.add_argument("--max-distance", default="auto", metavar="auto|search|sample|FLOAT",
                   help="k-reciprocal, scalable form: each point's largest distance (the row "
                        "normaliser): search = a farthest-point search per point, sample = over "
                        "8,192 sampled points, auto = search up to 20,000 points, else sample")
    g.add_argument("--qe-n", type=int, default=5, help="AQE / alpha-QE: gallery neighbours averaged (default 5)")
    g.add_argument("--alpha", type=float, default=3.0, help="alpha-QE: similarity exponent (default 3)")
    g.add_argument("--dba-n", type=int, default=5, help="DBA: neighbours averaged per gallery vector (default 5)")
    g.add_argument("--dba-alpha", type=float, default=0.0,
                   help="DBA: similarity exponent of the neighbours' weights (default 0: plain mean)")
    g.add_argument("--diffusion-k", type=int, default=20,
                   help="diffusion: neighbours per gallery vector in the kNN graph (default 20)")
    g.add_argument("--diffusion-alpha", type=float, default=0.99,
                   help="diffusion: alpha in [0, 1), weight of the graph over the query (default 0.99)")
    g.add_argument("--diffusion-gamma", type=float, default=3.0,
                   help="diffusion: similarity exponent of the affinities (default 3)")
    g.add_argument("--diffusion-query-k", type=int, default=10,
                   help="diffusion: query neighbours the diffusion starts from (default 10)")
    g.add_argument("--diffusion-truncate", type=int, default=1000,
                   help="diffusion, galleries over 20,000: diffuse on each query's top-N only (default 1000)")


def rerank_config(methods_text: str, args, topk: int | None = None):
    """RerankConfig from a --rerank value and the parameters; ValueError names a bad value."""
    from index.rerank.kreciprocal import RerankConfig

    methods = RerankConfig.parse_methods(methods_text or "none")
    if args.k1 < 1 or args.k2 < 1:
        raise ValueError(f"--k1 and --k2 must be >= 1, got {args.k1}, {args.k2}")
    if not 0.0 <= args.lambda_value <= 1.0:
        raise ValueError(f"--lambda-value must be in [0, 1], got {args.lambda_value}")
    if args.qe_n < 0 or args.dba_n < 0:
        raise ValueError("--qe-n and --dba-n must be >= 0")
    if args.alpha < 0 or args.dba_alpha < 0:
        raise ValueError("--alpha and --dba-alpha must be >= 0")
    if args.diffusion_k < 1 or args.diffusion_query_k < 1 or args.diffusion_truncate < 1:
        raise ValueError("--diffusion-k, --diffusion-query-k and --diffusion-truncate must be >= 1")
    if not 0.0 <= args.diffusion_alpha < 1.0:
        raise ValueError(f"--diffusion-alpha must be in [0, 1), got {args.diffusion_alpha}")
    if args.diffusion_gamma <= 0:
        raise ValueError(f"--diffusion-gamma must be > 0, got {args.diffusion_gamma}")
    max_distance = args.max_distance
    if max_distance not in ("auto", "search", "sample"):
        try:
            max_distance = float(max_distance)
        except ValueError:
            raise ValueError(f"--max-distance must be auto, search, sample or a number, got {args.max_distance!r}") from None
        if not max_distance > 0:
            raise ValueError(f"--max-distance must be > 0, got {args.max_distance}")
    extra = {} if topk is None else {"topk": int(topk)}
    return RerankConfig(methods=methods, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value,
                        qe_n=args.qe_n, alpha=args.alpha, dba_n=args.dba_n, dba_alpha=args.dba_alpha,
                        diffusion_k=args.diffusion_k, diffusion_alpha=args.diffusion_alpha,
                        diffusion_gamma=args.diffusion_gamma, diffusion_query_k=args.diffusion_query_k,
                        diffusion_truncate=args.diffusion_truncate, max_distance=max_distance, **extra)


def method_name(config) -> str | None:
    """The report's "rerank" value: the methods joined by ",", or None for none."""
    return None if config.methods == ("none",) else ",".join(config.methods)


def rerank_params(config) -> dict:
    """The parameters that matter for the chosen methods (what a report records)."""
    m = set(config.methods)
    out = {}
    if "kreciprocal" in m:
        out.update(k1=config.k1, k2=config.k2, lambda_value=config.lambda_value,
                   max_distance=config.max_distance)
    if "aqe" in m or "alpha-qe" in m:
        out["qe_n"] = config.qe_n
    if "alpha-qe" in m:
        out["alpha"] = config.alpha
    if "dba" in m:
        out.update(dba_n=config.dba_n, dba_alpha=config.dba_alpha)
    if "diffusion" in m:
        out.update(diffusion_k=config.diffusion_k, diffusion_alpha=config.diffusion_alpha,
                   diffusion_gamma=config.diffusion_gamma, diffusion_query_k=config.diffusion_query_k,
                   diffusion_truncate=config.diffusion_truncate)
    return out
