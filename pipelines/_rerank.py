"""Re-ranking options shared by query.py and evaluate.py (--rerank and its parameters).

The defaults and the checks are index.rerank.chain.RerankConfig's: the flags only name its fields."""
from __future__ import annotations

import re
from dataclasses import fields

METHODS_HELP = ("re-ranking: none, kreciprocal, aqe, alpha-qe, dba, diffusion, or a comma-separated "
                "combination (e.g. dba,alpha-qe,kreciprocal or dba,aqe,diffusion; applied as DBA, "
                "then QE, then k-reciprocal or diffusion)")

# RerankConfig field -> (type, help); the flag is --field-with-dashes, the default the field's
PARAMETERS = {
    "k1": (int, "k-reciprocal: k1"),
    "k2": (int, "k-reciprocal: k2, local query expansion"),
    "lambda_value": (float, "k-reciprocal: weight of the original distance"),
    "max_distance": (str, ("k-reciprocal, scalable form: each point's largest distance (the row "
                           "normaliser): search = a farthest-point search per point, sample = over "
                           "8,192 sampled points, auto = search up to 20,000 points, else sample; or a number")),
    "qe_n": (int, "AQE / alpha-QE: gallery neighbours averaged"),
    "alpha": (float, "alpha-QE: similarity exponent"),
    "dba_n": (int, "DBA: neighbours averaged per gallery vector"),
    "dba_alpha": (float, "DBA: similarity exponent of the neighbours' weights (0: plain mean)"),
    "diffusion_k": (int, "diffusion: neighbours per gallery vector in the kNN graph"),
    "diffusion_alpha": (float, "diffusion: alpha in [0, 1), weight of the graph over the query"),
    "diffusion_gamma": (float, "diffusion: similarity exponent of the affinities"),
    "diffusion_query_k": (int, "diffusion: query neighbours the diffusion starts from"),
    "diffusion_truncate": (int, "diffusion, galleries over 20,000: diffuse on each query's top-N only"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_rerank_arguments(p, repeatable: bool = False) -> None:
    """--rerank plus its parameters (defaults: the fields of index.rerank.chain.RerankConfig)."""
    from index.rerank.chain import RerankConfig

    if repeatable:
        p.add_argument("--rerank", action="append", default=None, metavar="METHODS",
                       help=METHODS_HELP + "; repeat to evaluate several (one report each)")
    else:
        p.add_argument("--rerank", default="none", metavar="METHODS", help=METHODS_HELP)
    defaults = {f.name: f.default for f in fields(RerankConfig)}
    g = p.add_argument_group("re-ranking parameters")
    for name, (kind, text) in PARAMETERS.items():
        g.add_argument(_flag(name), dest=name, type=kind, default=defaults[name],
                       help=f"{text} (default {defaults[name]})")


def rerank_config(methods_text: str, args, topk: int | None = None):
    """RerankConfig from a --rerank value and the parameters; ValueError names the bad flag."""
    from index.rerank.chain import RerankConfig

    extra = {} if topk is None else {"topk": int(topk)}
    try:
        return RerankConfig(methods=RerankConfig.parse_methods(methods_text or "none"),
                            **{name: getattr(args, name) for name in PARAMETERS}, **extra)
    except ValueError as e:  # the dataclass names its fields; the user typed flags
        raise ValueError(re.sub(r"\b(" + "|".join(PARAMETERS) + r")\b", lambda m: _flag(m.group(1)),
                                str(e))) from None
