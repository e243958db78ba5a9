"""Registration of the built-in tokenizers (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("tokenizer", "pixels", "genfw_vq.pixels:Pixels",
                      description="Each pixel value quantised to v levels is its code (no training)")
