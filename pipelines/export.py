"""Export the embedding model for serving elsewhere (ONNX or TorchScript).

    python pipelines/export.py --model out/model --format onnx --out model.onnx

Writes FILE (the network + L2-normalisation: its output is the project's embedding) and
FILE.json (the preprocessing contract: input size, RGB, scale, mean/std; output dimension;
model id). Both appear complete or not at all.
"""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: I001


from pipelines._cli import add_log_arguments, make_parser, run_main


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory (model.pt + config.json)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="export format")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (FILE.json is written beside it)")
    add_log_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    from serving.export import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' tracer warnings are about control flow we do not have
        contract = export_model(args.model, args.format, args.out)
    print(f"exported model {contract['model']} ({args.format}, input {contract['input']['shape']}, "
          f"output {contract['output']['shape']}) to {args.out} (+ {args.out}.json)")
    return 0


if __name__ == "__main__":
    run_main(main)
