"""The evaluate stage: the recipe's metrics into ``metrics.json``, each evaluation appended to
``metrics_history.jsonl`` with its date, genfw version and what differed from the run's recipe."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

from genfw import __version__, dist, io
from genfw.errors import GenfwError
from genfw.interfaces import Prior, Tokenizer
from genfw.loggers import LoggerSet, flat_hparams
from genfw.stages.base import Stage

HISTORY_FILE = "metrics_history.jsonl"


class EvaluateStage(Stage):
    name = "evaluate"

    def compute_inputs(self) -> dict[str, Any]:
        return {"samples": self.run.stage("samples").output_id(),
                "evaluate": self.run.recipe.evaluate.model_dump(mode="json")}

    def execute(self, tokenizer: Tokenizer, priors: list[Prior]) -> dict[str, Any]:
        run = self.run
        metrics_file = run.path("metrics.json")
        # under torchrun every rank takes part (sampling and fidelity features are split over
        # the ranks); rank 0 writes the results
        if not self.begin() and os.path.exists(metrics_file):
            return io.read_json(metrics_file)
        t0 = time.perf_counter()
        try:
            # late: start-up time (genfw.metrics loads torch-fidelity, ~1 s)
            from genfw.evaluate import evaluate_run

            metrics = evaluate_run(run, tokenizer, priors)
        except KeyboardInterrupt:
            raise GenfwError(
                f"evaluate: interrupted; the models and samples are kept, no metrics were written; run the same command "
                f"again (or `genfw eval {getattr(run, 'run_dir', run.dir)}`) to evaluate"
            ) from None
        if dist.is_main():
            io.write_json(metrics_file, metrics)
            self.append_history(metrics)
            self.log_metrics(metrics)
        self.finish(time.perf_counter() - t0)
        return metrics

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """The metrics (tags ``eval/<name>``, at the prior's last step) and the run's recipe as
        hyper-parameters, to the recipe's loggers in ``evaluate/`` (TensorBoard: its HPARAMS tab)."""
        numbers = {f"eval/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        loggers = LoggerSet(self.run.recipe.log, self.folder, stage=self.name)
        try:
            loggers.log_scalars(self.run.recipe.train.prior.steps, numbers)
            loggers.log_hparams(flat_hparams(self.run.resolved.raw), numbers)
        finally:
            loggers.close()

    def append_history(self, metrics: dict[str, Any]) -> None:
        """One JSON line per evaluation: the history survives recomputation."""
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "genfw_version": __version__,
                  "changed": self.run.changed_from_recipe, "fingerprint": self.fingerprint(),
                  "snapshots": getattr(self.run, "snapshots", {}), "folder": self.run.dir, "metrics": metrics}
        path = self.run.path(HISTORY_FILE)
        # append-only like the trainer's log: a crash can at worst cut the last line
        with io.open_append(path) as f:  # never through a symbolic link
            f.write((json.dumps(record, default=str) + "\n").encode("utf-8"))
