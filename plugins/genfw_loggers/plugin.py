"""Registration of the built-in training loggers."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("logger", "jsonl", "genfw_loggers.files:JSONLines",
                      description="One JSON line per record in log.jsonl (what the report plots)")
    registry.register("logger", "csv", "genfw_loggers.files:CSV",
                      description="log.csv: a header of tags and one row per record")
    registry.register("logger", "tensorboard", "genfw_loggers.tensorboard_logger:TensorBoard",
                      description="TensorBoard event files (scalars and images) under tensorboard/")
