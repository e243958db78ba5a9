"""Registration of genfw_sundae components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("prior", "sundae", "genfw_sundae.sundae:Sundae",
                      description="SUNDAE: step-unrolled denoising with self-stopping parallel sampling")
