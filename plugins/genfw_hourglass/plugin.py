"""Registration of genfw_hourglass components."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    pass
