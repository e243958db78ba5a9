"""Registration of genfw_maskgit components (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("prior", "maskgit", "genfw_maskgit.maskgit:MaskGIT",
                      description="MaskGIT: masked-token training, confidence-ordered parallel decoding (Chang et al. 2022)")
