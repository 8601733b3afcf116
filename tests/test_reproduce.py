"""scripts/reproduce.py: every row of the README's models table has a name; a tiny GPT row trains, prints its row
and JSON, is reused by the next call and retrained when an override changes its config."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import load_script
from minimodels.config import load_config

reproduce = load_script("reproduce")


def readme_models() -> list[str]:
    """The first cell of every row of the README's models table."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    table = text[text.index("| model | paper |"):].split("\n\n")[0].splitlines()[2:]
    return [line.split("|")[1].strip() for line in table]


def test_list_names_every_row_of_the_readme_table(capsys):
    assert reproduce.main(["--list"]) == 0
    listed = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _ in listed] == list(reproduce.ROWS)
    models = readme_models()
    assert len(models) >= 11 and {rest.split(" — ")[0] for _, rest in listed} == set(models)


def test_unknown_row_exits_2_naming_the_rows(capsys):
    assert reproduce.main(["gtp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown row 'gtp'" in err and "rows: gpt, bert, bert_finetune" in err
    assert reproduce.main(["bert_finetune", "gpt:train.max_steps=2"]) == 2  # a prefix names a run of the row
    assert "gpt is not a run of row bert_finetune (bert, bert_finetune, bert_scratch)" in capsys.readouterr().err


def test_every_run_is_a_valid_config_trained_after_the_runs_it_points_to(tmp_path):
    for name, run in reproduce.RUNS.items():
        load_config(run.config, [o.replace("{runs}", str(tmp_path)) for o in run.overrides])
        assert set(re.findall(r"\{runs\}/(\w+)", " ".join(run.overrides))) == set(run.after), name
    assert reproduce.needed(["bert_finetune", "bert_scratch", "gpt"]) == ["bert", "bert_finetune", "bert_scratch", "gpt"]


def test_wall_times_read_as_in_the_readme():
    assert [reproduce.minutes(s) for s in (221.4, 119.6, 42, None)] == ["3 min 41 s", "2 min 0 s", "42 s", None]


def test_inheritance_rows_time_the_first_evaluation_reaching_the_teachers_loss(tmp_path):
    def write(run, width, evals):  # evals: (step, val_loss, time_s)
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.yaml").write_text(f"model:\n  d_model: {width}\n")
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v, "time_s": t}) + "\n"
                                                              for s, v, t in evals))
    write("teacher", 128, [(375, 5.0, 50.0), (750, 4.7, 100.0)])
    write("scratch", 256, [(100, 5.0, 100.0), (200, 4.7, 200.0), (300, 4.6, 300.0)])
    write("inherit", 256, [(100, 4.69, 150.0), (200, 4.5, 260.0), (300, 4.4, 360.0)])
    n = reproduce.inherited("teacher", "scratch", "inherit")(tmp_path)
    assert n["steps_to_teacher"] == {"scratch": 200, "inherit": 100}
    assert n["wall_time_to_teacher_s"] == {"scratch": 200.0, "inherit": 150.0}
    assert n["val_loss"] == {"teacher": 4.7, "scratch": 4.6, "inherit": 4.4} and n["width"] == {"teacher": 128, "student": 256}
    assert n["steps_to_scratch_final"] == {"scratch": 300, "inherit": 200}
    assert n["wall_time_to_scratch_final_s"] == {"scratch": 300.0, "inherit": 260.0}
    assert reproduce.ROWS["inherit_gpt"].cell(n) == (
        "GPT of width 256 learning from one of width 128: the teacher's val loss 4.700 reached with it at step 100 "
        "(2 min 30 s), from scratch at step 200 (3 min 20 s) (**25% less wall time**); at the end 4.400 vs 4.600; the "
        "scratch run's final 4.600 reached from scratch at step 300, with the teacher at step 200 (**13% less wall time**)")
    write("never", 256, [(100, 5.0, 100.0), (300, 4.8, 300.0)])
    cell = reproduce.ROWS["inherit_bert"].cell(reproduce.inherited("teacher", "never", "inherit")(tmp_path))
    assert "reached with it at step 100 (2 min 30 s), from scratch never; at the end" in cell
    write("slow", 256, [(100, 4.7, 240.0)])  # fewer steps than from scratch, more time
    cell = reproduce.ROWS["inherit_gpt"].cell(reproduce.inherited("teacher", "scratch", "slow")(tmp_path))
    assert "at step 100 (4 min 0 s), from scratch at step 200 (3 min 20 s) (**20% more wall time**)" in cell


def test_a_tiny_gpt_row_trains_then_is_reused_then_retrains(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"doc{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog. " * 30)
    tiny = [f"data.source={docs}", "data.tokenizer=char", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
            "model.block_size=32", "train.max_steps=2", "train.batch_size=4", "train.eval_interval=2",
            "output.sample_tokens=0", "output.plot=false", "--runs-dir", str(tmp_path / "runs")]
    run_dir = tmp_path / "runs" / "gpt"
    r = subprocess.run([sys.executable, "scripts/reproduce.py", "gpt", *tiny], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    bpc = [e["val_bpc"] for e in events if "val_bpc" in e][-1]
    assert f"{run_dir}: training: python scripts/train.py configs/gpt.yaml" in r.stdout
    assert r.stdout.splitlines()[-1].startswith(f"| GPT | val_bpc **{bpc:.3f}** in ")

    weights = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["data"]["few_shot_seed"]  # as if the run predated that option (its default changes nothing)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert reproduce.main(["gpt", *tiny, "--json"]) == 0
    out, err = capsys.readouterr()
    numbers = json.loads(out)
    assert numbers["row"] == "gpt" and numbers["val_bpc"] == bpc and numbers["wall_time_s"]["gpt"] > 0
    assert numbers["unigram_val_bpc"] == events[0]["unigram_val_bpc"]
    assert f"{run_dir}: reused" in err and weights.stat().st_mtime_ns == written  # not trained again
    shutil.copytree(tmp_path / "runs", tmp_path / "moved")  # a runs folder copied elsewhere holds the same runs
    assert reproduce.main(["gpt", *tiny, "--runs-dir", str(tmp_path / "moved"), "--json"]) == 0
    assert f"{tmp_path / 'moved' / 'gpt'}: reused" in capsys.readouterr().err

    assert reproduce.main(["gpt", *tiny, "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir}: holds a different or older run; training it again" in out and out.rstrip().endswith("|")
    assert (run_dir / "checkpoints" / "step_00000003").is_dir() and not weights.exists()


GPT_SIZE = ["model.n_layer=1", "model.d_model=32", "model.n_head=2"]
SMALL = {"gpt": GPT_SIZE + ["data.vocab_size=300"],  # GPT's and BERT's keys
         "kb": GPT_SIZE,  # the knowledge base needs its vocabulary: every object one token
         "t5": ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64", "data.vocab_size=300"],
         "brivl": GPT_SIZE + ["model.embed_dim=32", "model.text.n_layer=1", "model.text.d_model=32", "model.text.n_head=2"],
         "ptuning": [],
         "vqvae": ["model.channels=8", "model.n_res_block=1", "model.codebook_size=16", "model.code_dim=4"]}
ARCH = {"t5": "t5", "t5_finetune": "t5", "t5_scratch": "t5", "t5_records": "t5", "brivl": "brivl", "clip": "brivl", "kb_bert": "kb",
        "kb_gpt": "kb", "ptuning_bert": "ptuning", "ptuning_gpt": "ptuning", "vqvae": "vqvae",
        **{f"fewshot_{m}_seed{k}": "ptuning" for k in reproduce.FEW_SHOT_SEEDS for m in ("ptuning", "ptuning_tuned")}}  # the others: "gpt"


@pytest.mark.slow
@pytest.mark.parametrize("row", list(reproduce.ROWS))
def test_every_row_runs_tiny_and_prints_its_numbers(row, tmp_path_factory):
    """Each row with 2 training steps per run (all rows share one runs folder): a row line and a JSON object."""
    runs = tmp_path_factory.getbasetemp() / "reproduce_runs"
    tiny = ["train.max_steps=2", "train.batch_size=4", "train.eval_batches=1", "train.eval_interval=2",
            "output.sample_tokens=0", "output.plot=false"]
    for run in reproduce.needed(reproduce.ROWS[row].runs):
        tiny += [f"{run}:{o}" for o in SMALL[ARCH.get(run, "gpt")] + ["model.contrastive.queue_size=8"] * (run == "brivl")]
    r = subprocess.run([sys.executable, "scripts/reproduce.py", row, *tiny, "--runs-dir", str(runs)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(f"| {reproduce.ROWS[row].model} | ")]
    assert at and (at[-1] == len(lines) - 1 or reproduce.ROWS[row].table is not None)  # the row, then its table
    r = subprocess.run([sys.executable, "scripts/reproduce.py", row, *tiny, "--runs-dir", str(runs), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "training" not in r.stderr, r.stderr[-2000:]
    assert json.loads(r.stdout)["row"] == row

