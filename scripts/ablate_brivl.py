"""What the momentum queue buys at a small batch: in-batch negatives against BriVL's momentum queue of 0 / 1k / 4k keys.

    python scripts/ablate_brivl.py [--batch-size 16] [--steps 1000] [--seed 1337] [--out runs/ablate_brivl]

Every variant is configs/brivl.yaml with the same overrides (batch size, steps, seed) plus its own
model.contrastive settings, trained by the ordinary Trainer into <out>/<name>; the last row is CLIP's
learned temperature for comparison. Prints a Markdown table of the final held-out metrics and writes it
to <out>/results.md (and every run's numbers to <out>/results.json).
"""

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = {  # name -> overrides of configs/brivl.yaml
    "inbatch": ["model.contrastive.kind=inbatch"],
    "queue_0": ["model.contrastive.queue_size=0"],
    "queue_1k": ["model.contrastive.queue_size=1024"],
    "queue_4k": ["model.contrastive.queue_size=4096"],
    "inbatch_learned_tau": ["model.contrastive.kind=inbatch", "model.contrastive.learn_temperature=true"],
}
COLUMNS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_sem_r1", "unseen_t2i_r1", "zeroshot_shape_acc")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1337, help="train.seed: model init and data order")
    p.add_argument("--out", default="runs/ablate_brivl")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    a = p.parse_args(argv)

    from minimodels.cli import guarded
    from minimodels.config import load_config
    from minimodels.train.run import run

    out = Path(a.out)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}

    def go():
        for name in a.only or VARIANTS:
            common = [f"train.seed={a.seed}", f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
                      f"train.eval_interval={a.steps}", f"train.save_interval={a.steps}", f"train.warmup_steps={a.steps // 10}", f"output.dir={out / name}"]
            cfg = load_config("configs/brivl.yaml", common + VARIANTS[name])
            t0 = time.perf_counter()
            metrics = run(cfg, overwrite=True, quiet=True)
            results[name] = metrics | {"seconds": round(time.perf_counter() - t0, 1), "overrides": common + VARIANTS[name]}
            print(f"{name}: " + "  ".join(f"{k} {metrics[k]:.3f}" for k in COLUMNS), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
        table = [f"batch {a.batch_size}, {a.steps} steps, seed {a.seed}", "",
                 "| variant | " + " | ".join(COLUMNS) + " | wall time |", "|---|" + "---:|" * (len(COLUMNS) + 1)]
        table += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in COLUMNS) + f" | {r['seconds']:.0f} s |"
                  for name, r in results.items()]
        (out / "results.md").write_text("\n".join(table) + "\n")
        print("\n".join(table))

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
