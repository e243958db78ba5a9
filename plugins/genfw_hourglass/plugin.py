"""Registration of genfw_hourglass components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("backbone", "hourglass", "genfw_hourglass.hourglass:Hourglass",
                      description="Hourglass transformer with 2D-aware (megapixel-SUNDAE) or 1D (Nawrot et al.) "
                                  "resampling, axial rotary positions; bidirectional only")
