"""Registration of genfw_autoregressive components."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    pass
