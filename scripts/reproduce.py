"""One command per row of the README's models table: train (or reuse) the runs the row needs, print the row.

    python scripts/reproduce.py --list                      # the rows, one line each
    python scripts/reproduce.py gpt                         # train runs/gpt (or reuse it), print the GPT row
    python scripts/reproduce.py bert_finetune --json        # the same numbers as one JSON object
    python scripts/reproduce.py gpt train.max_steps=20 --runs-dir /tmp/runs   # overrides apply to every run of the row
    python scripts/reproduce.py bert_finetune bert:train.max_steps=20          # ... or, with a prefix, to one run

A row names the runs it reads (RUNS: a config, its overrides, the runs it starts from); each lives in
<runs-dir>/<run name>, so `bert_finetune` reads runs/bert_finetune and runs/bert_scratch, and trains runs/bert
first. A run is reused when its folder holds a finished run (a checkpoint at train.max_steps) whose resolved
config.yaml is the one this command would write, trained after every run it starts from; otherwise it is
trained in this process (replacing a different run in the folder, which the line says). The row's numbers come
from the runs' metrics.jsonl (the last evaluation; wall_time_s, the whole training command, as run() records
it) and, for P-tuning and GLM, from `scripts/probe.py --json` and `scripts/infill.py --json`; the few-shot row also
scores the pretrained BERT zero-shot. A number the repo cannot measure yet is absent from the row and the JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import yaml

from minimodels.cli import guarded
from minimodels.config import ConfigError, load_config, parse, to_dict

SCRIPTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Run:
    config: str  # the YAML file
    overrides: tuple[str, ...] = ()  # dotted overrides; {runs} stands for --runs-dir
    after: tuple[str, ...] = ()  # the runs it starts from (model.init_from, data.tokenizer, train.teacher)


def started_from(run: str) -> tuple[str, ...]:
    """Overrides that point a config at the run folder `run` under --runs-dir: its weights and its tokenizer."""
    return (f"model.init_from={{runs}}/{run}", f"data.tokenizer={{runs}}/{run}/tokenizer.json")


def student(arch: str, eval_interval: int, teacher: str | None = None, teacher_run: str | None = None,
            data: tuple[str, ...] = ()) -> Run:
    """Knowledge inheritance (README): configs/<arch>.yaml with the overrides `data` at width 384 (6 heads of 64),
    evaluated every eval_interval steps, with the run `teacher_run` (default: the `arch` row's, the same config at
    width 256) as its teacher: alpha decaying from 1 with the train.teacher options `teacher` (YAML, e.g.
    "temperature: 1.0, decay_steps: 300, rows: 0.5"); teacher None: from scratch."""
    teacher_run = teacher_run or arch
    inherit = (f"train.teacher={{run: {{runs}}/{teacher_run}, alpha: 1.0, {teacher}}}",) if teacher else ()
    return Run(f"configs/{arch}.yaml", data + ("model.d_model=384", "model.n_head=6",
                                               f"data.tokenizer={{runs}}/{teacher_run}/tokenizer.json",
                                               f"train.eval_interval={eval_interval}") + inherit, (teacher_run,))


CODE = ("data.source=stdlib_code",)  # the stdlib's .py files: ~1.3 passes in configs/gpt.yaml's 1000 steps, not ~9
GATE_BUDGET = ("train.max_steps=300", "train.eval_interval=100", "train.save_interval=300")  # the gate table's runs
GATES = {  # Switch-GPT (8 experts in blocks 1 and 3, capacity factor 1.25) with each gate
    "switch": ("model.moe.gate=switch",),
    "topk1": ("model.moe.gate=topk", "model.moe.top_k=1"),
    "topk2": ("model.moe.gate=topk", "model.moe.top_k=2"),
    "noisy_topk2": ("model.moe.gate=noisy_topk", "model.moe.top_k=2"),
    "gshard": ("model.moe.gate=gshard",),
}

FEW_SHOT_SEEDS = range(4)  # each seed draws its own 32 train docstrings (data.few_shot_seed) and trains with it
FEW_SHOT = {  # method: the row label of the README's few-shot table, its config, the config's overrides
    "pet": ("PET: manual pattern, BERT fine-tuned", "configs/fewshot_pet.yaml", ()),
    "ptuning": ("P-tuning: frozen BERT, trained prompt", "configs/fewshot_ptuning.yaml", ()),
    "ptuning_tuned": ("P-tuning: BERT and prompt trained", "configs/fewshot_ptuning.yaml",
                      ("model.tune_lm=true", "train.lr=1e-4", "train.weight_decay=0.01")),  # PET's lr and weight decay
    "finetune": ("fine-tuning: [CLS] classifier", "configs/fewshot_finetune.yaml", ()),
}

RUNS = {
    "gpt": Run("configs/gpt.yaml"),
    "bert": Run("configs/bert.yaml"),
    "bert_finetune": Run("configs/bert_finetune.yaml", started_from("bert"), ("bert",)),
    "bert_scratch": Run("configs/bert_finetune.yaml", started_from("bert")[1:] + ("model.init_from=null",), ("bert",)),
    "t5": Run("configs/t5.yaml"),
    "t5_finetune": Run("configs/t5_finetune.yaml", started_from("t5"), ("t5",)),
    "t5_scratch": Run("configs/t5_finetune.yaml", started_from("t5")[1:] + ("model.init_from=null",), ("t5",)),
    "switch_gpt": Run("configs/switch_gpt.yaml"),
    "switch_bert": Run("configs/switch_bert.yaml"),
    "brivl": Run("configs/brivl.yaml"),
    "clip": Run("configs/clip.yaml"),
    "kb_bert": Run("configs/kb_bert.yaml"),
    "kb_gpt": Run("configs/kb_gpt.yaml"),
    "ptuning_bert": Run("configs/ptuning_bert.yaml", started_from("kb_bert"), ("kb_bert",)),
    "ptuning_gpt": Run("configs/ptuning_gpt.yaml", started_from("kb_gpt"), ("kb_gpt",)),
    "glm": Run("configs/glm.yaml"),
    "glm_1500": Run("configs/glm.yaml", ("train.max_steps=1500", "train.weight_decay=0.1")),  # GLM at BERT's budget (README)
    "glm_finetune": Run("configs/glm_finetune.yaml", started_from("glm_1500"), ("glm_1500",)),
    "glm_scratch": Run("configs/glm_finetune.yaml", started_from("glm_1500")[1:] + ("model.init_from=null",),
                       ("glm_1500",)),
    "vqvae": Run("configs/vqvae.yaml"),
    "cogview": Run("configs/cogview.yaml", ("data.image_tokenizer={runs}/vqvae",), ("vqvae",)),
    **{f"gate_{name}": Run("configs/switch_gpt.yaml", GATE_BUDGET + gate) for name, gate in GATES.items()},
    "gate_dense": Run("configs/gpt.yaml", GATE_BUDGET),  # also the dense run the upcycling row starts from
    "upcycle_dense": Run("configs/gpt.yaml", GATE_BUDGET + started_from("gate_dense"), ("gate_dense",)),
    "upcycle_switch": Run("configs/switch_gpt.yaml", GATE_BUDGET + started_from("gate_dense"), ("gate_dense",)),
    "ki_gpt_scratch": student("gpt", 25),
    "ki_gpt_inherit": student("gpt", 25, "temperature: 1.0, decay_steps: 300, rows: 0.5"),
    "gpt_code": Run("configs/gpt.yaml", CODE),  # the teacher on the stdlib's source code
    "ki_gpt_code_scratch": student("gpt", 50, teacher_run="gpt_code", data=CODE),
    "ki_gpt_code_inherit": student("gpt", 50, "temperature: 1.0, decay_steps: 300, rows: 0.5", teacher_run="gpt_code",
                                   data=CODE),
    "ki_bert_scratch": student("bert", 25),
    "ki_bert_inherit": student("bert", 25, "temperature: 2.0, decay_steps: 1000, rows: 1.0"),
    **{f"{arch}_records": Run(f"configs/{arch}_records.yaml") for arch in ("glm", "bert", "t5", "gpt")},
    **{f"fewshot_{method}_seed{seed}": Run(config, started_from("bert") + overrides + (
        f"data.few_shot_seed={seed}", f"train.seed={seed}"), ("bert",))
       for seed in FEW_SHOT_SEEDS for method, (_, config, overrides) in FEW_SHOT.items()},
}


# ---------------------------------------------------------------------------------------------- reading the runs
def final(runs: Path, run: str, key: str) -> float | None:
    """The last value of `key` in <runs>/<run>/metrics.jsonl (the final evaluation, or the end of the run)."""
    from minimodels.train.plot import read_events  # (imports torch: --list does not need it)

    values = [e[key] for e in read_events(runs / run) if key in e]
    return values[-1] if values else None


def reaching(runs: Path, run: str, target: float) -> dict | None:
    """The first evaluation of `run` with val_loss <= target, or None."""
    from minimodels.train.plot import read_events

    return next((e for e in read_events(runs / run) if e.get("val_loss", float("inf")) <= target), None)


def script_json(script: str, *args: str) -> dict:
    """Run scripts/<script> with --json; its numbers."""
    r = subprocess.run([sys.executable, str(SCRIPTS / script), *args, "--json"], capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"scripts/{script} {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout)


def minutes(seconds: float | None) -> str | None:
    """221.4 -> "3 min 41 s", 42 -> "42 s" (as the README writes wall times); None stays None."""
    if seconds is None:
        return None
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def part(text: str, *values) -> str:
    """`text` formatted with `values`, or "" when one of them is absent."""
    return "" if any(v is None for v in values) else text.format(*values)


# ---------------------------------------------------------------------------------------------- the rows
@dataclass(frozen=True)
class Row:
    model: str  # the first cell of its line in the README's models table (two rows may share a line)
    about: str  # one line for --list
    runs: tuple[str, ...]  # the runs it reads (the runs they start from are trained first)
    measure: Callable[[Path], dict]  # the runs folder -> the numbers (the JSON)
    cell: Callable[[dict], str]  # the numbers -> the README's result cell
    table: Callable[[dict], str] | None = None  # the numbers -> a markdown table printed below the row


def lm(run: str, metric: str):
    """Numbers of a pretraining row: the final `metric`, its unigram baseline (logged at step 0)."""
    return lambda runs: {metric: final(runs, run, metric), f"unigram_{metric}": final(runs, run, f"unigram_{metric}")}


def pair(metric: str, a: str, b: str, **more: tuple[str, str]):
    """Numbers of a comparison: {metric: {a: .., b: ..}} from runs a and b, plus more={key: (run, metric)}."""
    return lambda runs: ({metric: {a: final(runs, a, metric), b: final(runs, b, metric)}}
                         | {k: final(runs, r, m) for k, (r, m) in more.items()})


def probed(ptuned: str):
    """Numbers of a P-tuning row: scripts/probe.py's mean over relations (P@1 as shares)."""
    return lambda runs: {"p_at_1": script_json("probe.py", str(runs / ptuned))["mean"]}


def infilled(glm: str, bert: str, gpt: str, t5: str | None = None):
    """Numbers of a GLM row: GLM's final val loss, and scripts/infill.py's exact matches on the same blanks for GLM,
    BERT told and not told the length, GPT (and T5), overall and by the blank's length in words."""

    def measure(runs: Path) -> dict:
        named = {"glm": glm, "bert_told": bert, "gpt": gpt} | ({"t5": t5} if t5 else {})
        table = script_json("infill.py", *(str(runs / r) for r in named.values()))
        rows = {k: table["runs"][str(runs / r)] for k, r in named.items()} | {"bert_not_told": table["runs"][f"{runs / bert} (not told)"]}
        return ({"val_loss": final(runs, glm, "val_loss"), "blanks": table["blanks"],
                 "exact_match": {k: r["exact_match"]["all"] for k, r in rows.items()},
                 "exact_match_by_words": {k: {n: em for n, em in r["exact_match"].items() if n != "all"} for k, r in rows.items()}}
                | {k: v for k, v in table.items() if k == "left_only_chance"})
    return measure


def infill_table(n: dict) -> str:
    """Exact match by the blank's length in words, a line per model."""
    lengths = list(n["exact_match_by_words"]["glm"])
    lines = ["| model | " + " | ".join(f"EM {k} word{'s' * (k != '1')}" for k in lengths) + " | EM all |",
             "|---|" + "---:|" * (len(lengths) + 1)]
    for model, by_words in n["exact_match_by_words"].items():
        lines.append(f"| {model} | " + " | ".join(f"{by_words[k]:.3f}" for k in lengths) + f" | {n['exact_match'][model]:.3f} |")
    return "\n".join(lines)


def inherited(teacher: str, scratch: str, inherit: str):
    """Knowledge inheritance: the teacher's final val loss; per student the first evaluation reaching it (step and
    training time until then, absent if never), the first reaching the scratch student's final val loss, and its
    final val loss; the widths of teacher and students."""

    def measure(runs: Path) -> dict:
        target = final(runs, teacher, "val_loss")
        reached = {k: reaching(runs, r, target) for k, r in (("scratch", scratch), ("inherit", inherit))}
        width = {k: yaml.safe_load((runs / r / "config.yaml").read_text())["model"]["d_model"]
                 for k, r in (("teacher", teacher), ("student", inherit))}
        loss = {"teacher": target, "scratch": final(runs, scratch, "val_loss"), "inherit": final(runs, inherit, "val_loss")}
        # the scratch run's final loss, which it may have reached before its end (when it overfits)
        to_scratch_end = {k: reaching(runs, r, loss["scratch"]) for k, r in (("scratch", scratch), ("inherit", inherit))}
        return {"val_loss": loss, "width": width,
                "steps_to_teacher": {k: e["step"] for k, e in reached.items() if e},
                "wall_time_to_teacher_s": {k: e["time_s"] for k, e in reached.items() if e and "time_s" in e},
                "steps_to_scratch_final": {k: e["step"] for k, e in to_scratch_end.items() if e},
                "wall_time_to_scratch_final_s": {k: e["time_s"] for k, e in to_scratch_end.items() if e and "time_s" in e}}
    return measure


def saving(times: dict) -> str:
    """' (**20% less wall time**)' for times {"scratch": s, "inherit": i}; '' unless both are there."""
    if len(times) != 2:
        return ""
    saved = 1 - times["inherit"] / times["scratch"]
    return f" (**{abs(saved):.0%} {'less' if saved > 0 else 'more'} wall time**)"


def inherit_cell(arch: str):
    def cell(n: dict) -> str:
        steps, times, loss = n["steps_to_teacher"], n["wall_time_to_teacher_s"], n["val_loss"]
        at = {k: f"at step {steps[k]}" + part(" ({})", minutes(times.get(k))) if k in steps else "never"
              for k in ("inherit", "scratch")}
        end_steps, end_times = n["steps_to_scratch_final"], n["wall_time_to_scratch_final_s"]
        end = (f"; the scratch run's final {loss['scratch']:.3f} reached from scratch at step {end_steps['scratch']}, with "
               f"the teacher at step {end_steps['inherit']}{saving(end_times)}" if "inherit" in end_steps else "")
        return (f"{arch} of width {n['width']['student']} learning from one of width {n['width']['teacher']}: the "
                f"teacher's val loss {loss['teacher']:.3f} reached with it {at['inherit']}, from scratch "
                f"{at['scratch']}{saving(times)}; at the end {loss['inherit']:.3f} vs {loss['scratch']:.3f}{end}")
    return cell


def brivl_numbers(run: str):
    return lambda runs: {"t2i_r1": final(runs, run, "t2i_r1"), "chance_r1": final(runs, run, "chance_r1")}


def vqvae_numbers(runs: Path) -> dict:
    """The final reconstruction and codebook metrics on the gallery, the codebook's size and the token grid's side."""
    numbers = {k: final(runs, "vqvae", k) for k in ("val_mse", "val_psnr", "val_perplexity", "val_dead_codes", "val_parsed")}
    model = yaml.safe_load((runs / "vqvae" / "config.yaml").read_text())["model"]
    return numbers | {"codebook_size": model["codebook_size"], "grid": model["image_size"] // model["downsample"]}


def ptuning_cell(lm_name: str, pretrained: str, ptuned: str):
    return lambda n: (f"P@1 on held-out facts: {lm_name} **{100 * n['p_at_1']['ptuning']:.1f}** vs best manual prompt "
                      f"{100 * n['p_at_1']['best_manual']:.1f} (majority {100 * n['p_at_1']['majority']:.1f})"
                      + part("; pretraining {}", minutes(n["wall_time_s"].get(pretrained)))
                      + part(", P-tuning {}", minutes(n["wall_time_s"].get(ptuned))))


def few_shot_numbers(runs: Path) -> dict:
    """Val accuracy of each few-shot run (per method, a list over FEW_SHOT_SEEDS); the majority class of the whole train split and
    the manual pattern zero-shot (the pretrained MLM head, untrained), both on the PET runs' val split."""
    import torch

    from minimodels.config import load_config
    from minimodels.data.package_classification import PackagePromptTask
    from minimodels.train.device import autocast, resolve_dtype, to_device
    from minimodels.train.run import load_run
    from minimodels.train.trainer import val_batches

    cfg = load_config(runs / "fewshot_pet_seed0" / "config.yaml")
    _, model, tokenizer = load_run(runs / "bert", cfg.train.device)
    device = next(model.parameters()).device
    task = PackagePromptTask(tokenizer, {}, cfg.data.seq_len or cfg.model.block_size,
                             replace(cfg.data, train_examples=None))
    with torch.no_grad(), autocast(device, resolve_dtype(cfg.train.dtype, device)):
        zero_shot = task.evaluate(model, (to_device(b, device) for b in val_batches(task, cfg.train.batch_size)))["val_acc"]
    return {"examples": cfg.data.train_examples, "val_examples": len(task.val), "majority": task.unigram_baseline()["val_acc"],
            "zero_shot": zero_shot, "val_acc": {m: [final(runs, f"fewshot_{m}_seed{k}", "val_acc") for k in FEW_SHOT_SEEDS]
                                                for m in FEW_SHOT}}


def spread(values: list[float]) -> str:
    """"mean ± sample std" of shares, in percent."""
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def few_shot_table(n: dict) -> str:
    """Val accuracy (%) per seed and mean ± std, a line per method, below the majority and zero-shot lines."""
    seeds = len(FEW_SHOT_SEEDS)
    lines = ["| method | " + " | ".join(f"seed {k}" for k in FEW_SHOT_SEEDS) + " | mean ± std |", "|---|" + "---:|" * (seeds + 1),
             "| majority (whole train split) |" + " |" * seeds + f" {100 * n['majority']:.1f} |",
             "| manual prompt, zero-shot |" + " |" * seeds + f" {100 * n['zero_shot']:.1f} |"]
    for method, (label, *_) in FEW_SHOT.items():
        accs = n["val_acc"][method]
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + f" | {spread(accs)} |")
    return "\n".join(lines)


def moe_numbers(labelled: dict[str, str]):
    """Per run: final val_bpc, tokens/s, and (MoE runs) the dropped share and load entropy of the last log line,
    averaged over the MoE blocks."""

    def measure(runs: Path) -> dict:
        from minimodels.train.plot import read_events

        out = {}
        for label, run in labelled.items():
            last = ([{}] + [e for e in read_events(runs / run) if "loss" in e])[-1]  # the last train log line
            blocks = sorted({k[:-len("_dropped")] for k in last if k.endswith("_dropped")})
            out[label] = {"val_bpc": final(runs, run, "val_bpc"), "tokens_per_s": final(runs, run, "tokens_per_s")}
            if blocks:
                out[label] |= {m: sum(last[f"{b}_{m}"] for b in blocks) / len(blocks) for m in ("dropped", "load_entropy")}
        return out
    return measure


def moe_table(n: dict) -> str:
    lines = ["| model | val_bpc | dropped slots | load entropy | tokens / s |", "|---|---:|---:|---:|---:|"]
    for label, m in n.items():
        if isinstance(m, dict) and "val_bpc" in m:
            moe = f"{m['dropped']:.1%} | {m['load_entropy']:.3f}" if "dropped" in m else "– | –"
            lines.append(f"| {label} | {m['val_bpc']:.3f} | {moe} | {m['tokens_per_s'] or 0:,.0f} |")
    return "\n".join(lines)


def took(n: dict, run: str) -> str:
    return part(" in {}", minutes(n["wall_time_s"].get(run)))


ROWS = {
    "gpt": Row("GPT", "GPT on the stdlib docstrings: final val_bpc against the unigram baseline", ("gpt",),
               lm("gpt", "val_bpc"),
               lambda n: f"val_bpc **{n['val_bpc']:.3f}**{took(n, 'gpt')}" + part(" (unigram baseline {:.3f})", n["unigram_val_bpc"])),
    "bert": Row("BERT (masked LM)", "BERT masked-LM pretraining: val MLM accuracy against the unigram baseline", ("bert",),
                lm("bert", "val_mlm_acc"),
                lambda n: f"val MLM accuracy **{n['val_mlm_acc']:.3f}**{took(n, 'bert')}"
                + part(" (unigram {:.3f})", n["unigram_val_mlm_acc"])),
    "bert_finetune": Row("BERT fine-tuned", "package of a docstring: BERT fine-tuned from runs/bert vs from scratch",
                         ("bert_finetune", "bert_scratch"),
                         pair("val_acc", "bert_finetune", "bert_scratch", majority_val_acc=("bert_finetune", "unigram_val_acc")),
                         lambda n: f"package of a docstring: val acc **{n['val_acc']['bert_finetune']:.3f}** pretrained vs "
                         f"{n['val_acc']['bert_scratch']:.3f} from scratch" + part(" (majority {:.3f})", n["majority_val_acc"])),
    "t5": Row("T5 (span corruption)", "T5 span corruption: val loss and accuracy on the dropped spans", ("t5",),
              lambda runs: {k: final(runs, "t5", k) for k in ("val_span_loss", "val_span_acc")},
              lambda n: f"val loss on the dropped spans {n['val_span_loss']:.2f} nats/token, {n['val_span_acc']:.1%} of them "
              f"exact{took(n, 't5')}"),
    "t5_finetune": Row("T5 fine-tuned", "package of a docstring as text: T5 fine-tuned from runs/t5 vs from scratch",
                       ("t5_finetune", "t5_scratch"), pair("val_exact_match", "t5_finetune", "t5_scratch"),
                       lambda n: f"package of a docstring as text: exact match **{n['val_exact_match']['t5_finetune']:.3f}** "
                       f"pretrained vs {n['val_exact_match']['t5_scratch']:.3f} from scratch"),
    "switch_gpt": Row("Switch-GPT (MoE)", "Switch-GPT (8 experts) vs the dense GPT at equal steps: val_bpc",
                      ("switch_gpt", "gpt"), pair("val_bpc", "switch_gpt", "gpt"),
                      lambda n: f"val_bpc **{n['val_bpc']['switch_gpt']:.3f}** vs {n['val_bpc']['gpt']:.3f} dense at equal "
                      f"steps and FLOPs per token{took(n, 'switch_gpt')}"),
    "switch_bert": Row("Switch-BERT (MoE)", "Switch-BERT (8 experts) vs the dense BERT at equal steps: val MLM accuracy",
                       ("switch_bert", "bert"), pair("val_mlm_acc", "switch_bert", "bert"),
                       lambda n: f"val MLM accuracy {n['val_mlm_acc']['switch_bert']:.3f} vs {n['val_mlm_acc']['bert']:.3f} "
                       f"dense at equal steps" + (": no gain here" if n['val_mlm_acc']['switch_bert'] <= n['val_mlm_acc']['bert']
                                                  else "") + took(n, "switch_bert")),
    "brivl": Row("BriVL / CLIP (dual tower)", "BriVL (momentum queue): strict text->image R@1 on the held-out gallery",
                 ("brivl",), brivl_numbers("brivl"),
                 lambda n: f"held-out gallery of {round(1 / n['chance_r1'])} pictures: strict text->image R@1 "
                 f"**{n['t2i_r1']:.3f}** (chance {n['chance_r1']:.3f}){took(n, 'brivl')}"),
    "clip": Row("BriVL / CLIP (dual tower)", "CLIP (in-batch): strict text->image R@1 on the same gallery", ("clip",),
                brivl_numbers("clip"), lambda n: f"CLIP {n['t2i_r1']:.3f}{took(n, 'clip')}"),
    "ptuning_bert": Row("P-tuning (BERT / GPT frozen)", "P-tuning a frozen BERT (runs/kb_bert): P@1 vs manual prompts",
                        ("ptuning_bert",), probed("ptuning_bert"), ptuning_cell("BERT", "kb_bert", "ptuning_bert")),
    "ptuning_gpt": Row("P-tuning (BERT / GPT frozen)", "P-tuning a frozen GPT (runs/kb_gpt): P@1 vs manual prompts",
                       ("ptuning_gpt",), probed("ptuning_gpt"), ptuning_cell("GPT", "kb_gpt", "ptuning_gpt")),
    "glm": Row("GLM (blank infilling)", "GLM: val loss, and exact match on held-out blanks against BERT and GPT",
               ("glm", "bert", "gpt"), infilled("glm", "bert", "gpt"),
               lambda n: f"val loss {n['val_loss']:.3f} per Part B target{took(n, 'glm')}; on {n['blanks']} blanks in "
               f"held-out docstrings exact match {n['exact_match']['glm']:.3f}, BERT (told the length) "
               f"{n['exact_match']['bert_told']:.3f}, GPT {n['exact_match']['gpt']:.3f}"),
    "glm_finetune": Row("GLM fine-tuned (cloze)", "package of a docstring as a cloze: GLM pretrained as long as BERT "
                        "(1500 steps), fine-tuned vs from scratch, against BERT fine-tuned",
                        ("glm_finetune", "glm_scratch", "bert_finetune"),
                        pair("val_acc", "glm_finetune", "glm_scratch", bert_finetune=("bert_finetune", "val_acc"),
                             majority_val_acc=("glm_finetune", "unigram_val_acc")),
                        lambda n: f"package of a docstring as a cloze: val acc **{n['val_acc']['glm_finetune']:.3f}** "
                        f"pretrained vs {n['val_acc']['glm_scratch']:.3f} from scratch, BERT fine-tuned "
                        f"{n['bert_finetune']:.3f}" + part(" (majority {:.3f})", n["majority_val_acc"])),
    "vqvae": Row("VQ-VAE (CogView's image tokenizer)", "VQ-VAE on the shapes pictures: reconstruction of the held-out "
                 "gallery and codebook usage", ("vqvae",), vqvae_numbers,
                 lambda n: f"held-out gallery as {n['grid']}x{n['grid']} tokens: PSNR **{n['val_psnr']:.1f} dB** (MSE {n['val_mse']:.4f}), "
                 f"codebook perplexity {n['val_perplexity']:.1f} of {n['codebook_size']} codes, {n['val_dead_codes']:.1%} dead"
                 + part(", {:.1%} of the reconstructions parsed as their scene", n["val_parsed"]) + took(n, "vqvae")),
    "cogview": Row("CogView (text to image)", "our GPT draws the VQ-VAE tokens of held-out captions' pictures, reranked "
                   "by runs/clip: share the caption is true of (scene parser), seen vs UNSEEN pairs; CLIP R-precision",
                   ("cogview", "clip"), lambda runs: script_json("judge_cogview.py", str(runs / "cogview"), "--clip", str(runs / "clip")),
                   lambda n: f"{n['captions']} held-out captions x {n['samples']} pictures: the caption is true of the parsed "
                   f"picture for {n['drawn']['all']['true']:.1%} of the pictures, **{n['drawn']['all']['reranked']:.1%}** of "
                   f"the captions' best by CLIP (UNSEEN pairs {n['drawn']['unseen']['reranked']:.1%}); CLIP R-precision "
                   f"{n['drawn']['all']['r_precision']:.3f} (gallery pictures {n['gallery']['all']['r_precision']:.3f}, chance "
                   f"{n['r_precision_chance']:.3f}){took(n, 'cogview')}"),
    "moe_gates": Row("Switch-GPT gates", "Switch-GPT with each gate (switch, topk k=1/2, noisy_topk, gshard) and the "
                     "dense GPT, 300 steps each: val_bpc, dropped slots, load entropy, tokens/s",
                     tuple(f"gate_{g}" for g in GATES) + ("gate_dense",),
                     moe_numbers({**{g: f"gate_{g}" for g in GATES}, "dense": "gate_dense"}),
                     lambda n: "300 steps: " + ", ".join(f"{g} {n[g]['val_bpc']:.3f}" for g in (*GATES, "dense")),
                     moe_table),
    "fewshot": Row("Few-shot (32 docstrings)", "package of a docstring from 32 labelled ones, 4 seeds: PET, P-tuning "
                   "(BERT frozen or tuned) and fine-tuning from runs/bert, against zero-shot and the majority class",
                   tuple(f"fewshot_{m}_seed{k}" for k in FEW_SHOT_SEEDS for m in FEW_SHOT), few_shot_numbers,
                   lambda n: f"val acc over {len(FEW_SHOT_SEEDS)} seeds: PET **{spread(n['val_acc']['pet'])}**, P-tuning "
                   f"{spread(n['val_acc']['ptuning'])} (BERT frozen) / {spread(n['val_acc']['ptuning_tuned'])} (BERT "
                   f"tuned), fine-tuning {spread(n['val_acc']['finetune'])}; manual prompt zero-shot "
                   f"{100 * n['zero_shot']:.1f}, majority {100 * n['majority']:.1f}", few_shot_table),
    "upcycling": Row("Sparse upcycling", "a dense GPT trained 300 steps, then 300 more steps as the dense GPT or "
                     "upcycled into Switch-GPT, against Switch-GPT trained 300 steps from scratch: val_bpc",
                     ("upcycle_dense", "upcycle_switch", "gate_switch"),
                     moe_numbers({"dense, 300 steps": "gate_dense", "dense, +300 steps": "upcycle_dense",
                                  "upcycled Switch-GPT, +300 steps": "upcycle_switch",
                                  "Switch-GPT from scratch, 300 steps": "gate_switch"}),
                     lambda n: f"upcycled Switch-GPT **{n['upcycled Switch-GPT, +300 steps']['val_bpc']:.3f}** vs "
                               f"{n['dense, +300 steps']['val_bpc']:.3f} continuing the dense GPT (300 + 300 steps)",
                     moe_table),
    "inherit_gpt": Row("Knowledge inheritance", "a GPT of width 384 (configs/gpt.yaml) learning from the gpt row's "
                       "(width 256) vs from scratch: steps and wall time to the teacher's val loss",
                       ("ki_gpt_scratch", "ki_gpt_inherit"), inherited("gpt", "ki_gpt_scratch", "ki_gpt_inherit"),
                       inherit_cell("GPT")),
    "inherit_gpt_code": Row("Knowledge inheritance", "the inherit_gpt row on the stdlib's source code (data.source "
                            "stdlib_code, ~1.3 passes in 1000 steps instead of ~9)", ("ki_gpt_code_scratch",
                            "ki_gpt_code_inherit"), inherited("gpt_code", "ki_gpt_code_scratch", "ki_gpt_code_inherit"),
                            inherit_cell("GPT")),
    "inherit_bert": Row("Knowledge inheritance", "a BERT of width 384 (configs/bert.yaml) learning from the bert row's "
                        "(width 256) vs from scratch: steps and wall time to the teacher's val loss",
                        ("ki_bert_scratch", "ki_bert_inherit"), inherited("bert", "ki_bert_scratch", "ki_bert_inherit"),
                        inherit_cell("BERT")),
    "glm_records": Row("GLM (both-sides blanks)", "GLM, T5, BERT (told the length, and not) and GPT on held-out order "
                       "records whose blanks the summary on their right restates: exact match",
                       ("glm_records", "bert_records", "t5_records", "gpt_records"),
                       infilled("glm_records", "bert_records", "gpt_records", "t5_records"),
                       lambda n: f"{n['blanks']} blanks of 1-4 words in held-out records, decided by the text right of "
                       f"them: exact match GLM **{n['exact_match']['glm']:.3f}** (not told the length), T5 "
                       f"{n['exact_match']['t5']:.3f} (not told), BERT {n['exact_match']['bert_told']:.3f} told / "
                       f"{n['exact_match']['bert_not_told']:.3f} not told, GPT (left context) {n['exact_match']['gpt']:.3f}; "
                       f"left-only chance {n['left_only_chance']:.4f}", infill_table),
}


# ---------------------------------------------------------------------------------------------- running
def needed(names) -> list[str]:
    """`names` and the runs they start from, each after the runs it starts from."""
    order = []
    for name in names:
        for first in needed(RUNS[name].after) + [name]:
            if first not in order:
                order.append(first)
    return order


def same_run(cfg, run_dir: Path, ckpt: Path) -> bool:
    """run_dir, whose latest checkpoint is `ckpt`, holds a finished run (ckpt at train.max_steps) of `cfg`: the
    resolved config.yaml equals cfg's, where the model keys cfg leaves to the data (None, e.g. vocab_size) take the
    saved values, and output.dir is not compared. The saved config is read as a YAML of today's code is, so a key
    added to the code since then takes its default (a run keeps being reused when a new option, off by default,
    appears)."""
    if ckpt.name != f"step_{cfg.train.max_steps:08d}" or not (run_dir / "config.yaml").is_file():
        return False
    try:
        saved = to_dict(parse(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml")))
    except ConfigError:  # a key renamed or removed since: not this command's run
        return False
    ours = to_dict(cfg)
    ours["model"] = {k: saved["model"].get(k) if v is None else v for k, v in ours["model"].items()}
    ours["output"]["dir"] = saved["output"]["dir"]  # a run folder moved or copied under another name is the same run
    return saved == ours


def split_run(override: str) -> tuple[str | None, str]:
    """"bert:train.max_steps=20" -> ("bert", "train.max_steps=20"): an override for one run; without a prefix
    (a ':' in the value does not count), (None, override): for every run."""
    run, colon, rest = override.partition(":")
    return (run, rest) if colon and "=" not in run else (None, override)


def train_or_reuse(name: str, runs: Path, overrides: list[str], say, quiet: bool) -> None:
    """Reuse <runs>/<name> if it holds this run, finished after the runs it starts from; else train it. `say`
    prints which, with the training command."""
    from minimodels.train.checkpoint import latest_checkpoint
    from minimodels.train.run import run

    spec, run_dir = RUNS[name], runs / name
    mine = [override for run, override in map(split_run, overrides) if run in (None, name)]
    config_overrides = [o.replace("{runs}", str(runs)) for o in spec.overrides] + mine + [f"output.dir={run_dir}"]
    cfg = load_config(spec.config, config_overrides)
    command = shlex.join(["python", "scripts/train.py", spec.config, *config_overrides])
    ckpt = latest_checkpoint(run_dir)
    written = lambda c: (c / "model.safetensors").stat().st_mtime  # noqa: E731
    if ckpt is not None and same_run(cfg, run_dir, ckpt) and all(written(latest_checkpoint(runs / a)) <= written(ckpt)
                                                                 for a in spec.after):
        say(f"{run_dir}: reused, a finished run of {command}")
        return
    say(f"{run_dir}: {'holds a different or older run; training it again' if ckpt else 'training'}: {command}"
        + (" --overwrite" if ckpt else ""))
    run(cfg, overwrite=ckpt is not None, quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", metavar="NAME [[RUN:]key=value ...]", help="a row (see --list), then "
                    "overrides applied to every config the row trains, or with RUN: to that run's only")
    ap.add_argument("--list", action="store_true", help="name every row with a one-line description")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object (what the runs did "
                    "goes to stderr)")
    ap.add_argument("--runs-dir", default="runs", help="where the run folders live (default runs/)")
    a = ap.parse_intermixed_args(argv)

    def go():
        if a.list:
            for name, row in ROWS.items():
                print(f"{name:<14} {row.model} — {row.about}")
            return
        names = [x for x in a.args if "=" not in x]
        overrides = [x for x in a.args if "=" in x]
        if len(names) != 1 or names[0] not in ROWS:
            raise ConfigError(f"{'one row name expected' if len(names) != 1 else f'unknown row {names[0]!r}'}; "
                              f"rows: {', '.join(ROWS)}")
        row, runs = ROWS[names[0]], Path(a.runs_dir)
        for run, override in map(split_run, overrides):
            if run is not None and run not in needed(row.runs):
                raise ConfigError(f"{run}:{override}: {run} is not a run of row {names[0]} ({', '.join(needed(row.runs))})")
            if override.partition("=")[0].strip() == "output.dir":
                raise ConfigError("output.dir: set by reproduce.py (<runs-dir>/<run name>); pick the folder with --runs-dir")
        say = (lambda line: print(line, file=sys.stderr)) if a.json else print
        for name in needed(row.runs):
            train_or_reuse(name, runs, overrides, say, quiet=a.json)
        times = {r: final(runs, r, "wall_time_s") for r in needed(row.runs)}
        numbers = row.measure(runs) | {"wall_time_s": {r: t for r, t in times.items() if t is not None}}
        if a.json:
            print(json.dumps({"row": names[0], **numbers}))
        else:
            print(f"| {row.model} | {row.cell(numbers)} |")
            if row.table is not None:
                print("\n" + row.table(numbers))

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
