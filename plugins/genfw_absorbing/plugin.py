"""Registration of genfw_absorbing components."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    pass
