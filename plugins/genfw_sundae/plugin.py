"""Registration of genfw_sundae components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("prior", "sundae", "genfw_sundae.sundae:Sundae",
                      description="SUNDAE: step-unrolled denoising with self-stopping parallel sampling")
    registry.register("converter", "sundae", "genfw_sundae.convert_sundae:convert_sundae",
                      description="Convert a megapixel-SUNDAE (vvvm23/sundae-vqgan) checkpoint-NNNNNNN.pt into a genfw sundae prior")
