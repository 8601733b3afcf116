"""What the momentum queue buys at a small batch: in-batch negatives against BriVL's momentum queue of 0 / 1k / 4k keys.

    python scripts/ablate_brivl.py [--batch-size 16] [--steps 1000] [--seeds 1337 2 3] [--out runs/ablate_brivl]

Every variant is configs/brivl.yaml with the same overrides (seed, batch size, steps) plus its own
model.contrastive settings, trained by the ordinary Trainer into <out>/seed<S>/<name>; the last row is CLIP's
learned temperature for comparison. Each run's final held-out metrics are kept in <out>/results.json, and a
(variant, seed) already there is not trained again (delete the file to start over). Prints a Markdown table
of the mean over the seeds (with t2i R@1 of every seed) and writes it to <out>/results.md.
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
    p.add_argument("--seeds", type=int, nargs="+", default=[1337], help="train.seed of each repetition")
    p.add_argument("--out", default="runs/ablate_brivl")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    a = p.parse_args(argv)

    from minimodels.cli import guarded
    from minimodels.config import load_config
    from minimodels.train.run import run

    out = Path(a.out)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    names = a.only or list(VARIANTS)

    def go():
        for seed in a.seeds:
            for name in names:
                key = f"{name}/seed{seed}/batch{a.batch_size}/steps{a.steps}"
                if key in results:
                    continue
                common = [f"train.seed={seed}", f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
                          f"train.eval_interval={a.steps}", f"train.save_interval={a.steps}",
                          f"train.warmup_steps={a.steps // 10}", f"output.dir={out / f'seed{seed}' / name}"]
                cfg = load_config("configs/brivl.yaml", common + VARIANTS[name])
                t0 = time.perf_counter()
                metrics = run(cfg, overwrite=True, quiet=True)
                results[key] = metrics | {"seconds": round(time.perf_counter() - t0, 1), "overrides": common + VARIANTS[name]}
                print(f"{key}: " + "  ".join(f"{k} {metrics[k]:.3f}" for k in COLUMNS), flush=True)
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=1))
        table = [f"batch {a.batch_size}, {a.steps} steps; mean over seeds {', '.join(map(str, a.seeds))}", "",
                 "| variant | " + " | ".join(COLUMNS) + " | t2i_r1 per seed | wall time |",
                 "|---|" + "---:|" * (len(COLUMNS) + 2)]
        for name in names:
            runs = [results[f"{name}/seed{s}/batch{a.batch_size}/steps{a.steps}"] for s in a.seeds]
            mean = {k: sum(r[k] for r in runs) / len(runs) for k in (*COLUMNS, "seconds")}
            table.append(f"| {name} | " + " | ".join(f"{mean[k]:.3f}" for k in COLUMNS) + " | "
                         + " / ".join(f"{r['t2i_r1']:.3f}" for r in runs) + f" | {mean['seconds']:.0f} s |")
        (out / "results.md").write_text("\n".join(table) + "\n")
        print("\n".join(table))

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
