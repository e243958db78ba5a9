"""Registration of genfw_absorbing components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("prior", "absorbing", "genfw_absorbing.absorbing:Absorbing",
                      description="Absorbing-state discrete diffusion (Unleashing Transformers)")
    registry.register("converter", "unleashing", "genfw_absorbing.convert_unleashing:convert_unleashing",
                      description="Convert Unleashing Transformers absorbing_<step>.th (prior) or vqgan_<step>.th files")
