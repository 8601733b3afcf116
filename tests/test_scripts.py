"""The README's commands, end to end on a tiny model: train from configs/gpt.yaml with overrides, then generate."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import load_script


def sh(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = sh("scripts/train.py", "configs/gpt.yaml", "train.max_steps=4", "model.n_layer=1", "model.d_model=32",
           "model.n_head=2", "model.block_size=32", "train.batch_size=4", "train.eval_batches=2",
           "train.eval_interval=2", "output.sample_tokens=8", f"output.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_train_script_writes_the_run_folder(tiny_run):
    out, r = tiny_run
    assert "--- sample ---" in r.stdout and "final: val_loss" in r.stdout
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in e for e in events)
    evals = [e for e in events if "val_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and all("val_bpc" in e for e in evals)


def test_generate_script(tiny_run):
    out, _ = tiny_run
    r = sh("scripts/generate.py", str(out), "--prompt", "Return the", "--max-new-tokens", "10",
           "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Return the")
    r = sh("scripts/generate.py", str(out), "--prompt", "word " * 100)
    assert r.returncode == 2 and "longer than model.block_size=32" in r.stderr and "Traceback" not in r.stderr


def test_console_command_and_missing_resume(tiny_run, tmp_path):
    out, _ = tiny_run
    r = sh("-m", "minimodels.cli", "generate", str(out), "--max-new-tokens", "3", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    r = sh("scripts/train.py", "--resume", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "config.yaml: config file not found" in r.stderr


def test_resume_from_the_command_line_extends_the_run(tiny_run):
    out, _ = tiny_run
    # options may stand between the config file and the overrides, as in the README
    r = sh("scripts/train.py", "configs/gpt.yaml", "--resume", str(out), "train.max_steps=6", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "checkpoints" / "step_00000006" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6


@pytest.mark.parametrize("config", ["gpt", "bert", "t5"])
def test_bench_train_script(config):
    tiny = ["model.n_layer=1", "train.batch_size=2", "data.vocab_size=64"]
    tiny += {"gpt": ["model.d_model=32", "model.n_head=2", "model.block_size=16"],
             "bert": ["model.d_model=32", "model.n_head=2", "model.block_size=16", "data.seq_len=16"],
             "t5": ["model.d_model=32", "model.n_head=2", "model.d_ff=64", "data.seq_len=16"]}[config]
    r = sh("scripts/bench_train.py", f"configs/{config}.yaml", *tiny, "--rounds", "1", "--steps", "1",
           "--warmup", "0", "--dtypes", "fp32", "--peak-sizes", "64", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| fp32 |")]
    assert len(rows) == 3 + (config == "gpt") and any("HF" in row for row in rows)
    assert any("nanoGPT-style" in row for row in rows) == (config == "gpt")  # which checked that it computes our loss


@pytest.mark.slow  # Inductor compiles C++ with gcc: ~1 min with an empty compile cache
def test_bench_train_script_times_a_compiled_copy():
    tiny = ["model.n_layer=1", "train.batch_size=2", "data.vocab_size=64", "model.d_model=32", "model.n_head=2",
            "model.block_size=16"]
    r = sh("scripts/bench_train.py", "configs/gpt.yaml", *tiny, "--rounds", "1", "--steps", "1", "--warmup", "1",
           "--dtypes", "fp32", "--peak-sizes", "64", "--threads", "1", "--compile")
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(line.startswith("| fp32 | ours (manual), compiled |") for line in r.stdout.splitlines())


@pytest.mark.parametrize("config", ["gpt", "bert"])
def test_bench_inherit_script(config):
    tiny = ["model.n_layer=1", "model.d_model=16", "model.n_head=2", "model.block_size=16", "data.seq_len=16",
            "train.batch_size=2", "data.vocab_size=64"]
    r = sh("scripts/bench_inherit.py", f"configs/{config}.yaml", *tiny, "--student", "model.d_model=32",
           "--rounds", "1", "--warmup", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ")[0] for line in r.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert rows == ["| student alone", "| student + teacher", "| teacher forward alone", "| added by the teacher (forward + KL)"]
    assert "student (model.d_model=32)" in r.stdout and "FLOPs of the teacher's forward / FLOPs of a student step" in r.stdout


@pytest.mark.slow
def test_generate_with_t5_and_bert_runs(tmp_path):
    """generate serves each architecture: T5 writes an output for the prompt (greedy and beam), BERT fills [MASK]."""
    common = ["train.max_steps=2", "model.n_layer=1", "model.n_head=2", "train.batch_size=4", "train.eval_batches=1",
              "data.vocab_size=300", "output.sample_tokens=4"]
    runs = {"t5": common + ["model.d_model=32", "model.d_ff=64", "data.seq_len=32"],
            "bert": common + ["model.d_model=32", "model.block_size=32"]}
    for name, overrides in runs.items():
        r = sh("scripts/train.py", f"configs/{name}.yaml", *overrides, f"output.dir={tmp_path / name}", "--quiet")
        assert r.returncode == 0, r.stderr[-2000:]
    for beams in ("1", "3"):
        r = sh("scripts/generate.py", str(tmp_path / "t5"), "--prompt", "Return the <extra_id_0> of the list.",
               "--max-new-tokens", "5", "--temperature", "0", "--num-beams", beams)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    r = sh("scripts/generate.py", str(tmp_path / "bert"), "--prompt", "Return the [MASK] of the [MASK].", "--top-k", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[MASK] 1", "[MASK] 2"] and all(line.count("'") == 6 for line in lines)
    r = sh("scripts/generate.py", str(tmp_path / "bert"), "--prompt", "no blank here")
    assert r.returncode == 2 and "no [MASK]" in r.stderr
    r = sh("scripts/generate.py", str(tmp_path / "bert"), "--prompt", "a [MASK]", "--num-beams", "2")
    assert r.returncode == 2 and "--num-beams" in r.stderr


# (generate's options, the option the one-line error names)
GENERATE_RULES = [
    (["--temperature", "-1"], "--temperature"),  # would sample the least likely tokens
    (["--num-samples", "0"], "--num-samples"),
    (["--top-k", "0"], "--top-k"),
    (["--top-k", "-3"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-beams", "0"], "--num-beams"),
    (["--device", "banana"], "--device"),
    (["--device", "cuda:7"], "--device"),  # no such GPU here (or on most machines)
]


@pytest.mark.parametrize("options, key", GENERATE_RULES, ids=[" ".join(o) for o, _ in GENERATE_RULES])
def test_generate_options_stop_with_one_line_naming_the_option(tiny_run, capsys, options, key):
    from minimodels.cli import generate_main

    out, _ = tiny_run
    assert generate_main([str(out), *options]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {key}: ") and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


@pytest.mark.parametrize("args, line", [
    (["scripts/generate.py", "{run}", "--temperature", "-1"], "error: --temperature: must be >= 0 (0: greedy), got -1.0"),
    (["scripts/train.py", "configs"], "error: configs: is a folder, not a config file (a run folder's is configs/config.yaml)"),
    (["scripts/train.py", "configs/bert.yaml", "data.task=causal_lm"], "error: configs/bert.yaml: data.task: causal_lm makes "
     "batches for model.arch gpt, not bert (which trains on masked_lm or package_classification or package_prompt)"),
])
def test_scripts_exit_2_with_one_line(tiny_run, args, line):
    out, _ = tiny_run
    r = sh(*[a.replace("{run}", str(out)) for a in args])
    assert (r.returncode, r.stderr) == (2, line + "\n")


def test_every_task_answers_generate_and_the_default_refuses():
    """`minimodels generate` calls TASKS[data.task].generate for every run: each task has one (TextTask's)."""
    from minimodels.config import ConfigError
    from minimodels.data import TASKS
    from minimodels.models import GPT, GPTConfig
    from minimodels.protocols import Generation, TextTask

    assert all(TextTask in task.__mro__ for task in TASKS.values())  # (a Protocol refuses issubclass)

    class Quiet(TextTask):  # a task that writes no text keeps the default
        pass

    model = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(ConfigError, match="^generate: a gpt run writes no text$"):
        Quiet.generate(model, None, Generation("runs/x"))



def test_plot_redraws_skips_a_cut_last_line_and_the_script_names_a_broken_one(tiny_run, tmp_path):
    import shutil

    from minimodels.train import RunFolderError
    from minimodels.train.plot import plot_metrics, read_events

    out, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    metrics = run / "metrics.jsonl"
    whole = read_events(run)
    metrics.write_text(metrics.read_text() + '{"step": 6, "val_lo')  # a process killed while writing a line
    assert read_events(run) == whole
    (run / "loss.png").unlink()
    assert plot_metrics(run) == run / "loss.png" and (run / "loss.png").is_file()
    with pytest.raises(RunFolderError, match="metrics.jsonl: not found"):
        read_events(tmp_path / "nowhere")
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json"] + lines[1:]) + "\n")
    r = sh("scripts/plot.py", str(run))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {metrics}: line 2 is not JSON"


def test_bench_moe_prints_every_variant_with_the_floor_and_cpu_clock_needs_one_thread():
    args = ("scripts/bench_moe.py", "--experts", "4", "--top-k", "1", "--dtypes", "fp32", "bf16", "--rounds", "1",
            "--reps", "1", "--tokens", "64", "--d-model", "16", "--d-ff", "32", "--loop-tokens", "8", "--clock", "cpu")
    r = sh(*args, "--threads", "1")
    assert r.returncode == 0, r.stderr
    fp32, bf16 = (line.split("|")[1:-1] for line in r.stdout.strip().splitlines()[-2:])  # dtype, E, k, 7 times, 6 ratios
    assert fp32[:3] == [" fp32 ", " 4 ", " 1 "] and bf16[:3] == [" bf16 ", " 4 ", " 1 "]
    assert len(fp32) == len(bf16) == 16 and fp32[8] == " – "  # the floor with bf16 weights: bf16 only
    assert all(float(c) > 0 for c in fp32[3:8] + fp32[9:10] + bf16[3:10])
    r = sh(*args, "--threads", "2")
    assert r.returncode != 0 and "--clock cpu counts one thread's CPU time: it needs --threads 1" in r.stderr


def test_same_metrics_compares_logs_bit_for_bit_without_timings(tmp_path):
    """scripts/same_metrics.py: keys ending in _s are left out; a float one ulp apart is a difference, named by
    its line and key; a log cut short is one too."""
    same_metrics = load_script("same_metrics")
    loss = 2.0 / 3.0
    logs = {"a": [{"step": 1, "loss": loss, "tokens_per_s": 10.0}, {"step": 2, "val_loss": loss, "time_s": 1.0}],
            "timed": [{"step": 1, "loss": loss, "tokens_per_s": 20.0}, {"step": 2, "val_loss": loss, "time_s": 3.0}],
            "ulp": [{"step": 1, "loss": loss}, {"step": 2, "val_loss": math.nextafter(loss, 1.0)}]}
    for name, events in logs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    a, timed, ulp = (same_metrics.untimed(tmp_path / name) for name in logs)
    assert same_metrics.first_difference(a, timed) == ""
    assert same_metrics.first_difference(a, ulp).startswith("line 2: val_loss (")
    assert same_metrics.first_difference(a, a[:1]) == "2 vs 1 lines"


def test_copy_probe_restates_every_target_where_its_docstring_says(monkeypatch, capsys):
    """Each GLM variant's Part B target is the text token at its position: Part A's position (glm_single: the text's,
    so the restatement is N + 1 away), or p1 + p2 - 1 in the text (glm_spans_text); and the GPT variants score
    exactly the second copy. The script runs end to end and prints its table."""
    probe = load_script("copy_probe")
    g = torch.Generator().manual_seed(0)
    N, MASK, EOP = probe.N, probe.MASK, probe.EOP
    for variant in ("glm_single", "glm_spans_text", "glm_suffix"):
        for _ in range(20):
            x = torch.randint(0, probe.V, (N,), generator=g)
            text = torch.cat([x, x.new_tensor([probe.SEP]), x])
            ex = probe.glm_example(text, variant, 0.3, g)
            A = int(ex["part_a_len"])
            part_a, p1, p2 = ex["input_ids"][:A], ex["position_ids"], ex["block_position_ids"]
            for t in (ex["labels"] != EOP).nonzero().squeeze(1).tolist():
                if t < A:
                    continue
                where = int(p1[t] + p2[t] - 1) if variant != "glm_single" else int(p1[t])
                assert ex["labels"][t] == text[where]  # the text's position of the target
                if variant == "glm_single" and where != N:  # Part A position = text position; restated N + 1 away
                    other = where + N + 1 if where < N else where - N - 1
                    assert part_a[other] in (text[where], MASK)
            if variant != "glm_spans_text":
                continue
            kept = (part_a != MASK).nonzero().squeeze(1)
            assert torch.equal(part_a[kept], text[p1[:A][kept]])  # Part A keeps the text's positions
    for variant in ("gpt", "gpt_shift"):
        inputs, restated, labels = probe.batch(variant, 8, 0.15, g)
        ids = inputs["input_ids"]
        for b in range(8):
            cols = (restated[b] != -100).nonzero().squeeze(1)
            assert len(cols) == N and torch.equal(ids[b, cols + 1], ids[b, :N]) and torch.equal(restated[b, cols], ids[b, :N])
    monkeypatch.setattr(sys, "argv", ["copy_probe.py", "gpt", "glm_spans", "--steps", "2", "--every", "1"])
    probe.main()
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("| glm_spans | ")
