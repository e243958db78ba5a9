"""Registration of genfw_autoregressive components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("prior", "autoregressive", "genfw_autoregressive.autoregressive:Autoregressive",
                      description="Raster-order autoregressive prior with key/value-cached sampling")
