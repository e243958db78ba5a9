"""Registration of genfw_transformer components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("backbone", "transformer", "genfw_transformer.transformer:Transformer",
                      description="Pre-norm transformer (learned or 2D rotary positions), bidirectional or causal "
                                  "with a KV cache")
