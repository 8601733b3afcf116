"""metrics.jsonl, the one log of a run, and the running means of the metrics written there."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from minimodels.train.checkpoint import RunFolderError


class Mean:
    """Running means of dicts of tensors: add() per step, pop() -> {name: float or list of floats} and reset."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, values: dict) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.n += 1

    def pop(self) -> dict:
        out = {k: [round(x, 6) for x in (v / self.n).tolist()] if v.dim() else round(float(v / self.n), 6)
               for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


class MetricsLog:
    """metrics.jsonl: one JSON object per event, each with "step". On resume, events after the
    checkpoint's step (written by the interrupted run) are dropped so the file tells one story, and so is a
    last line cut short by the interruption (saying so); the file is rewritten atomically (temp file + rename)."""

    def __init__(self, path: Path, after_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            lines, keep = [line for line in path.read_text().splitlines() if line], []
            for n, line in enumerate(lines, 1):
                try:
                    if json.loads(line)["step"] <= after_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    if n < len(lines):
                        raise RunFolderError(f"{path}: line {n} is not JSON (only a cut-short last line is dropped)") from None
                    print(f"note: {path}: dropped its last line, cut short: {line[:40]!r}", file=sys.stderr)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    def write(self, **event) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
