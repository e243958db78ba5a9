"""Registration of genfw_transformer components."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    pass
