"""Registration of genfw_absorbing components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("prior", "absorbing", "genfw_absorbing.absorbing:Absorbing",
                      description="Absorbing-state discrete diffusion (Unleashing Transformers)")
