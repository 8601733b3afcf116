"""Command line: `minimodels train CONFIG [key=value ...]` and `minimodels generate RUN_DIR --prompt ...`.

scripts/train.py and scripts/generate.py are the same commands. Bad input ends with one line on stderr
naming the file and key, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

TRAIN_HELP = """examples:
  minimodels train configs/gpt.yaml
  minimodels train configs/gpt.yaml train.max_steps=200 model.n_layer=2 output.dir=runs/tiny
  minimodels train configs/gpt.yaml --resume runs/gpt train.max_steps=4000"""


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train", description="Train a model from a YAML config.", epilog=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]",
                   help="config file, then dotted overrides such as train.max_steps=200")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint, "
                   "with its saved config.yaml (overrides still apply)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar or prints")
    a = p.parse_intermixed_args(argv)  # options may stand between the config and the overrides
    overrides = [x for x in a.args if "=" in x]
    paths = [x for x in a.args if "=" not in x]
    if len(paths) > 1:
        p.error(f"one config file expected, got {paths}")
    if not paths and not a.resume:
        p.error("a config file is required (or --resume RUN_DIR)")

    from pathlib import Path

    from minimodels.config import load_config
    from minimodels.train.run import run

    def go():
        if a.resume:
            # the run's own resolved config is what its checkpoint was trained with
            if paths and not a.quiet:
                print(f"note: resuming with {Path(a.resume) / 'config.yaml'}; {paths[0]} is not read")
            cfg = load_config(Path(a.resume) / "config.yaml", overrides + [f"output.dir={a.resume}"])
        else:
            cfg = load_config(paths[0], overrides)
        run(cfg, resume=bool(a.resume), overwrite=a.overwrite, quiet=a.quiet)

    return guarded(go)


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="generate", description="Use a trained run: GPT continues the prompt; T5 "
                                "writes the output for the prompt as input (sentinels like <extra_id_0> mark "
                                "blanks); BERT (head mlm) fills each [MASK] of the prompt with one token; GLM fills "
                                "each [MASK] / [sMASK] / [gMASK] with as many tokens as it likes.")
    p.add_argument("run_dir", help="run folder written by train (config.yaml, tokenizer.json, checkpoints/)")
    p.add_argument("--prompt", default="", help="GPT: text to continue (empty: start a new document); "
                   "T5: the input text; BERT and GLM: text with [MASK] tokens (GLM without one: continue the text)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="GLM: per blank")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (GPT, T5)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest; BERT: candidates shown (5)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the likeliest tokens that make up this "
                   "share of the probability, in (0, 1]")
    p.add_argument("--num-beams", type=int, default=1, help="T5: beam search with this many beams")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    a = p.parse_args(argv)

    def go():
        import math

        import torch

        from minimodels.config import need
        from minimodels.data import TASKS
        from minimodels.protocols import Generation
        from minimodels.train.run import load_run

        need(a.max_new_tokens > 0, "--max-new-tokens", f"must be positive, got {a.max_new_tokens}")
        need(0 <= a.temperature < math.inf, "--temperature", f"must be >= 0 (0: greedy), got {a.temperature}")
        need(a.top_k is None or a.top_k > 0, "--top-k", f"must be positive, got {a.top_k}")
        need(a.top_p is None or 0 < a.top_p <= 1, "--top-p", f"must be in (0, 1], got {a.top_p}")
        need(a.num_beams > 0, "--num-beams", f"must be positive, got {a.num_beams}")
        need(a.num_samples > 0, "--num-samples", f"must be positive, got {a.num_samples}")
        cfg, model, tok = load_run(a.run_dir, a.device)
        generator = torch.Generator(next(model.parameters()).device).manual_seed(a.seed)
        request = Generation(a.run_dir, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.num_beams,
                             a.num_samples, not a.no_cache, generator)
        print(TASKS[cfg.data.task].generate(model, tok, request))  # the run's task knows how its model writes

    return guarded(go)


def guarded(fn) -> int:
    """Run fn; turn the library's input errors (a bad config, data, a damaged run folder) into one line on stderr
    and exit code 2."""
    from minimodels.config import ConfigError
    from minimodels.data import DataError
    from minimodels.train import RunFolderError, TrainingError

    try:
        fn()
    except (ConfigError, DataError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume <run folder> (from its latest checkpoint)", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "generate": generate_main}
    if not argv or argv[0] not in commands:
        print("usage: minimodels {train,generate} ...  (minimodels train -h for help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
