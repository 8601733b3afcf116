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

        from minimodels.config import ConfigError, need
        from minimodels.train.run import load_run

        need(a.max_new_tokens > 0, "--max-new-tokens", f"must be positive, got {a.max_new_tokens}")
        need(0 <= a.temperature < math.inf, "--temperature", f"must be >= 0 (0: greedy), got {a.temperature}")
        need(a.top_k is None or a.top_k > 0, "--top-k", f"must be positive, got {a.top_k}")
        need(a.top_p is None or 0 < a.top_p <= 1, "--top-p", f"must be in (0, 1], got {a.top_p}")
        need(a.num_beams > 0, "--num-beams", f"must be positive, got {a.num_beams}")
        need(a.num_samples > 0, "--num-samples", f"must be positive, got {a.num_samples}")
        cfg, model, tok = load_run(a.run_dir, a.device)
        if a.num_beams > 1 and cfg.model.arch != "t5":
            raise ConfigError(f"--num-beams {a.num_beams}: beam search is for T5 runs")
        device = next(model.parameters()).device
        g = torch.Generator(device).manual_seed(a.seed)
        arch = cfg.model.arch
        elsewhere = {  # runs whose model does not write text, and the script that uses them
            "brivl": f"a brivl run embeds images and texts; search it with python scripts/search.py {a.run_dir} \"a red circle\"",
            "ptuning": f"a ptuning run answers its probe's prompts; print its table with python scripts/probe.py {a.run_dir}",
        }
        if arch in elsewhere:
            raise ConfigError(f"generate: {elsewhere[arch]}")
        if arch == "bert":
            return fill_mask(model, tok, a.prompt, a.top_k or 5, device)
        if arch == "glm":
            from minimodels.data.blank_infilling import encode_blanks, fill_blanks, show_fills

            part_a, blanks = encode_blanks(tok, a.prompt)
            for i in range(a.num_samples):
                fills = fill_blanks(model, tok, part_a, blanks, a.max_new_tokens, a.temperature, a.top_k, a.top_p, g)
                print(("-" * 40 + "\n") * (i > 0) + show_fills(tok, part_a, blanks, fills))
            return
        if arch == "t5":
            ids = tok.encode(a.prompt) + [tok.eos_id]  # the encoder input ends with eos, as in training
        else:
            ids = tok.encode(a.prompt) if a.prompt else [tok.eos_id]
            if len(ids) > model.config.block_size:
                raise ConfigError(f"--prompt is {len(ids)} tokens, longer than model.block_size={model.config.block_size}")
        for i in range(a.num_samples):
            idx = torch.tensor([ids], device=device)
            options = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, use_cache=not a.no_cache, generator=g)
            if i:
                print("-" * 40)
            if arch == "t5":
                out = model.generate(idx, max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, eos_token_id=tok.eos_id,
                                     **options)  # (1, 1 + n): the start token (pad), then the output
                out_ids = out[0, 1:].tolist()
                out_ids = out_ids[: out_ids.index(tok.eos_id) + 1] if tok.eos_id in out_ids else out_ids  # pad after eos
                print(tok.decode(out_ids, skip_special_tokens=False))
            else:
                out = model.generate(idx, a.max_new_tokens, **options)
                print(a.prompt + tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False))  # shows <|endoftext|>

    return guarded(go)


def fill_mask(model, tok, prompt: str, top_k: int, device) -> None:
    """BERT: print the top_k candidates with their probabilities for every [MASK] in the prompt."""
    import torch

    from minimodels.config import ConfigError

    if model.config.head != "mlm":
        raise ConfigError(f"generate: this BERT run has model.head={model.config.head!r}; only an mlm head fills masks")
    if tok.mask_id is None:
        raise ConfigError("generate: the run's tokenizer has no [MASK] token")
    ids = [tok.cls_id] + tok.encode(prompt) + [tok.sep_id]  # [CLS] prompt [SEP], as the MLM task builds inputs
    if len(ids) > model.config.block_size:
        raise ConfigError(f"--prompt is {len(ids)} tokens, longer than model.block_size={model.config.block_size}")
    masked = [t for t, i in enumerate(ids) if i == tok.mask_id]
    if not masked:
        raise ConfigError("--prompt has no [MASK] to fill, e.g. --prompt \"Return the [MASK] of the list.\"")
    with torch.no_grad():
        probs = model(torch.tensor([ids], device=device)).logits[0].float().softmax(-1)  # (T, V)
    for n, t in enumerate(masked):
        p, cand = probs[t].topk(top_k)
        print(f"[MASK] {n + 1}: " + "  ".join(f"{tok.decode([c])!r} {q:.3f}" for c, q in zip(cand.tolist(), p.tolist())))


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
