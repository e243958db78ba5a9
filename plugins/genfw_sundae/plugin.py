"""Registration of genfw_sundae components."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    pass
