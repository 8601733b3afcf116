"""Every shipped config made tiny (a few CPU seconds in fp32), and runs of them: shared by
tests/test_combinations.py and scripts/same_metrics.py. The runs read N_SCENES shapes scenes (set
minimodels.data.shapes.N_TRAIN to it) and the stdlib docstrings write_docs writes."""

import json
from pathlib import Path

from minimodels.config import load_config
from minimodels.data.corpus import stdlib_records
from minimodels.train.run import prepare, run

PRETRAINING = {"bert_finetune": "bert", "glm_finetune": "glm", "t5_finetune": "t5", "ptuning_bert": "kb_bert",
               "ptuning_gpt": "kb_gpt", "fewshot_pet": "bert", "fewshot_ptuning": "bert", "fewshot_finetune": "bert"}
IMAGE_TOKENIZER = {"cogview": "vqvae"}  # data.image_tokenizer: a tiny run of this config (2 steps)
N_SCENES = 64  # train scenes of the shapes world (its N_TRAIN)

B = 2  # the micro-batch of the accumulation and 2-process rows; the reference runs batch 2B
COMMON = ("train.device=cpu", "train.dtype=fp32", "train.max_steps=4", "train.save_interval=2", "train.eval_interval=2",
          "train.eval_batches=1", "train.log_interval=1", "train.warmup_steps=1", "train.keep_last=5",
          f"train.batch_size={2 * B}", "output.sample_tokens=0", "output.plot=false")
SMALL = ("model.n_layer=1", "model.d_model=32", "model.n_head=2")
TEXT = ("model.block_size=32", "data.vocab_size=512", "data.source={docs}")  # a task that reads any text
KB = ("model.block_size=32", "data.kb_documents=2")
T5 = ("model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.d_ff=64", "data.seq_len=32")
TOWERS = SMALL + ("model.embed_dim=16", "model.text.n_layer=1", "model.text.d_model=32", "model.text.n_head=2")
MOE = ("model.moe.num_experts=4", "model.moe.every=1")
TINY = {
    "gpt": SMALL + TEXT,
    "bert": SMALL + TEXT,
    "glm": SMALL + TEXT,
    "switch_gpt": SMALL + TEXT + MOE,
    "switch_bert": SMALL + TEXT + MOE,
    "t5": T5 + ("data.vocab_size=512", "data.source={docs}"),
    "kb_gpt": SMALL + KB,
    "kb_bert": SMALL + KB,
    "bert_finetune": SMALL + ("model.block_size=32",),  # stdlib docstrings labelled by package
    "glm_finetune": SMALL + ("model.block_size=32",),  # the same docstrings, as a cloze
    "t5_finetune": T5,
    "ptuning_gpt": ("data.kb_documents=2",),  # the model is the pretraining run's
    "ptuning_bert": ("data.kb_documents=2",),
    "fewshot_pet": SMALL + ("model.block_size=32",),  # 32 stdlib docstrings labelled by package, as a cloze
    "fewshot_ptuning": ("data.seq_len=32",),  # the model is the pretraining run's
    "fewshot_finetune": SMALL + ("model.block_size=32",),
    "clip": TOWERS,
    "brivl": TOWERS + ("model.contrastive.queue_size=8",),
    "glm_records": SMALL + ("model.block_size=32",),  # generated order records (data.source records)
    "bert_records": SMALL + ("model.block_size=32",),
    "gpt_records": SMALL + ("model.block_size=32",),
    "t5_records": T5,
    "cogview": SMALL,  # the captions of 64 train scenes and the tiny vqvae run's 8 x 8 codes
    "vqvae": ("model.channels=8", "model.n_res_block=1", "model.codebook_size=16", "model.code_dim=4",
              "model.restart_below=0.995"),  # the codes no latent picks restart at every step
}


def write_docs(path: Path) -> Path:
    """400 stdlib docstrings as JSON lines at `path`: data.source for the tasks that read any text."""
    path.write_text("".join(json.dumps(r["text"]) + "\n" for r in stdlib_records()[:400]))
    return path


class Runs:
    """Tiny runs of the shipped configs, each trained once per module (runs.trained), and their configs. Every
    run of a config reads one tokenizer.json: a run that trains its own WordPiece tokenizer numbers tokens
    differently each time (test_a_config_run_twice_trains_the_same)."""

    def __init__(self, root: Path, docs: Path, tokenizers: Path | None = None):
        """Runs in folders under `root` read the docstrings in `docs`; tokenizers are trained under `tokenizers`
        (default: `root`)."""
        self.root, self.docs, self.tokenizers, self.made = root, docs, tokenizers or root, {}

    def pretrained(self, name: str) -> Path:
        """The pretraining run a fine-tuning config starts from (2 steps)."""
        return self.trained(PRETRAINING[name], "train.max_steps=2")

    def tokenizer(self, name: str) -> Path:
        """The tokenizer.json every run of configs/<name>.yaml reads: its pretraining run's, or one trained once."""
        if name in PRETRAINING:
            return self.pretrained(name) / "tokenizer.json"
        folder = self.tokenizers / f"{name}_tokenizer"
        if not folder.is_dir():
            prepare(load_config(f"configs/{name}.yaml", self.overrides(name, tokenizer=False)), folder)
        return folder / "tokenizer.json"

    def overrides(self, name: str, *extra: str, tokenizer: bool = True) -> list[str]:
        """configs/<name>.yaml made tiny, with the shared tokenizer (a fine-tuning config: its pretraining run's
        tokenizer and weights), then `extra`."""
        start = [f"model.init_from={self.pretrained(name)}"] if name in PRETRAINING else []
        if name in IMAGE_TOKENIZER:
            start.append(f"data.image_tokenizer={self.trained(IMAGE_TOKENIZER[name], 'train.max_steps=2')}")
        shared = [f"data.tokenizer={self.tokenizer(name)}"] if tokenizer else []
        return [*COMMON, *(o.format(docs=self.docs) for o in TINY[name]), *start, *shared, *extra]

    def config(self, name: str, out: Path, *extra: str):
        return load_config(f"configs/{name}.yaml", [*self.overrides(name, *extra), f"output.dir={out}"])

    def trained(self, name: str, *extra: str) -> Path:
        if (name, extra) not in self.made:
            out = self.root / f"{name}_{len(self.made)}"
            self.train(name, out, self.overrides(name, *extra))
            self.made[name, extra] = out
        return self.made[name, extra]

    def train(self, name: str, out: Path, overrides: list[str]) -> None:
        """Train configs/<name>.yaml with `overrides` into `out`, in this process."""
        run(load_config(f"configs/{name}.yaml", [*overrides, f"output.dir={out}"]), quiet=True)
