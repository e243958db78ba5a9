"""The evaluate stage: the recipe's metrics into ``metrics.json``, each evaluation appended to
``metrics_history.jsonl`` with its date, genfw version and what differed from the run's recipe."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

from genfw import __version__, dist, io
from genfw.interfaces import Prior, Tokenizer
from genfw.stages.base import Stage

HISTORY_FILE = "metrics_history.jsonl"


class EvaluateStage(Stage):
    name = "evaluate"

    def compute_inputs(self) -> dict[str, Any]:
        return {"samples": self.run.stage("samples").output_id(),
                "evaluate": self.run.recipe.evaluate.model_dump(mode="json")}

    def execute(self, tokenizer: Tokenizer, priors: list[Prior]) -> dict[str, Any]:
        from genfw.evaluate import evaluate_run

        run = self.run
        metrics_file = run.path("metrics.json")
        # under torchrun every rank takes part (sampling and fidelity features are split over
        # the ranks); rank 0 writes the results
        if not self.begin() and os.path.exists(metrics_file):
            return io.read_json(metrics_file)
        t0 = time.perf_counter()
        metrics = evaluate_run(run, tokenizer, priors)
        if dist.is_main():
            io.write_json(metrics_file, metrics)
            self.append_history(metrics)
        self.finish(time.perf_counter() - t0)
        return metrics

    def append_history(self, metrics: dict[str, Any]) -> None:
        """One JSON line per evaluation: the history survives recomputation."""
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "genfw_version": __version__,
                  "changed": self.run.changed_from_recipe, "fingerprint": self.fingerprint(),
                  "snapshots": getattr(self.run, "snapshots", {}), "folder": self.run.dir, "metrics": metrics}
        path = self.run.path(HISTORY_FILE)
        # append-only like the trainer's log: a crash can at worst cut the last line
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
