"""The stages of a run, each a unit of its own; ``base`` holds the lifecycle they share."""

from genfw.stages.base import Record, Stage, file_fingerprint, fingerprint, train_inputs
from genfw.stages.evaluate import EvaluateStage
from genfw.stages.latents import LatentsStage
from genfw.stages.prior import PriorStage
from genfw.stages.report import ReportStage
from genfw.stages.sample import SampleStage
from genfw.stages.tokenizer import TokenizerStage

__all__ = ["EvaluateStage", "LatentsStage", "PriorStage", "Record", "ReportStage", "SampleStage", "Stage",
           "TokenizerStage", "file_fingerprint", "fingerprint", "train_inputs"]
