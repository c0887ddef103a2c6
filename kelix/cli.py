"""The ``kelix`` command: Lightning's fit/validate/test/predict plus the kit's own verbs.

This file imports nothing heavy: ``kelix --help`` must answer at once. Each verb names the function
that implements it (``module:function``, taking the remaining argv) and is imported only when run.
"""

from __future__ import annotations

import sys

# Lightning verbs, run by kelix.training.cli.KelixCLI (LightningCLI).
LIGHTNING_VERBS = {
    "fit": "train a model from a recipe: kelix fit --config recipes/<component>/<stage>.yaml",
    "validate": "run the validation loop of a recipe on a checkpoint",
    "test": "run the test loop of a recipe on a checkpoint",
    "predict": "run the predict loop of a recipe on a checkpoint",
}

# The kit's own verbs: name -> (implementation, one-line help). Later components register here.
KIT_VERBS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("kelix.data.synthetic_cli:main", "write synthetic shards (OCR, captions, VQA, text-to-image)"),
    "data": ("kelix.data.convert.cli:main", "data convert (public formats -> shards), data validate, data stats"),
    "validate-shards": ("kelix.data.validate_cli:main", "alias of kelix data validate"),
    "build-codebook": ("kelix.tokenizer.codebook:main", "k-means codebook init from shards (faiss): S = N*K centroids"),
    "export-tokenizer": ("kelix.tokenizer.export:main", "tokenizer checkpoint -> HF-style directory (no aux LM)"),
    "tokenize": ("kelix.tokenizer.pretokenize:main", "write shards with {key}.{i}.codes.npy code grids beside the pixels"),
    "unify-embeddings": ("kelix.llm.unify:main", "fold tokenizer + stage-1 up-projectors into one image embedding table"),
    "export-llm": ("kelix.llm.export:main", "LLM checkpoint -> HF-style directory"),
    "export-dit": ("kelix.dit.export:main", "DiT checkpoint -> HF-style directory (EMA weights)"),
    "precompute-dit": ("kelix.dit.precompute:main", "DiT shards -> shards of VAE latents + LLM condition states"),
    "convert": ("kelix.official.cli:main", "the released Kelix: convert official (release -> kit), convert to-official"),
    "convert-checkpoint": ("kelix.training.convert:main", "sharded (distributed) checkpoint -> HF-style directory"),
    "chat": ("kelix.pipeline_cli:chat", "answer a question about an image with an exported pipeline"),
    "generate": ("kelix.pipeline_cli:generate", "generate an image from a prompt with an exported pipeline"),
    "eval": ("kelix.eval.cli:main", "benchmarks: eval run (a pipeline on a benchmark), eval score, eval list"),
    "quickstart": ("kelix.quickstart:main", "the whole pipeline on tiny models and synthetic data, on CPU"),
    "estimate": ("kelix.estimate.cli:main", "parameters, memory per GPU, FLOPs and time of a recipe's run, before launch"),
    "serve": ("kelix.serve.cli:main", "serve a pipeline behind an OpenAI-compatible HTTP API (batched)"),
    "ablate": ("kelix.ablate:main", "Tables 6/7 ablations: recipes/ablations/ suites, trained, scored, tabulated"),
}


def _usage() -> str:
    width = max(len(v) for v in (*LIGHTNING_VERBS, *KIT_VERBS)) + 2
    lines = ["usage: kelix <verb> [options]   (kelix <verb> --help for a verb's options)", "", "training (LightningCLI):"]
    lines += [f"  {v:<{width}}{h}" for v, h in LIGHTNING_VERBS.items()]
    lines += ["", "kit verbs:"]
    lines += [f"  {v:<{width}}{h}" for v, (_, h) in sorted(KIT_VERBS.items())]
    lines += ["", "Recipes live in recipes/; several --config files merge left to right; --print_config shows the result."]
    lines += ["An input error is one line; kelix <verb> --debug (or KELIX_DEBUG=1) shows its traceback."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from kelix import __version__

        print(f"kelix {__version__}")
        return 0
    from kelix.console.errors import debug_requested, one_line_errors  # input errors: one line (--debug: all)

    debug = debug_requested(argv)
    verb, rest = argv[0], argv[1:]
    if verb in LIGHTNING_VERBS:
        from kelix.training.cli import run_lightning_cli

        with one_line_errors(verb, rest, debug):
            run_lightning_cli([verb, *rest])
        return 0
    if verb in KIT_VERBS:
        import importlib

        module, func = KIT_VERBS[verb][0].split(":")
        with one_line_errors(verb, rest, debug):
            return getattr(importlib.import_module(module), func)(rest)
    import difflib

    near = difflib.get_close_matches(verb, [*LIGHTNING_VERBS, *KIT_VERBS], n=1)
    print(f"kelix: unknown verb {verb!r}{f': did you mean {near[0]}?' if near else ''} (kelix --help lists the verbs)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
