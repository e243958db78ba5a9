"""The report stage: ``report.md`` and ``curves.png`` (always rewritten; it is cheap)."""

from __future__ import annotations

from genfw.interfaces import Prior, Tokenizer
from genfw.progress import console
from genfw.report import write_report
from genfw.stages.base import Stage


class ReportStage(Stage):
    name = "report"

    def compute_inputs(self):
        return {}

    def execute(self, tokenizer: Tokenizer, priors: list[Prior] | None) -> None:
        write_report(self.run, tokenizer, priors)
        console.print(f"[green]✓[/green] report -> {self.run.path('report.md')}")
