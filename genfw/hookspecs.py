"""The plugin contract: one hook through which a plugin registers its components.

A plugin is any module exposed through the ``genfw`` entry-point group that implements
``genfw_register``::

    from genfw import hookimpl

    @hookimpl
    def genfw_register(registry):
        registry.register("prior", "muse", "genfw_muse.prior:Muse",
                          description="Muse parallel decoding")

Components are named by ``"module:attr"`` strings (imported only when built, so discovery and
``genfw --help`` stay fast) or by the class itself (a function, for converters). The kinds are
``genfw.registry.KNOWN_KINDS`` (tokenizer, backbone, prior, dataset, logger, converter); any other
is refused at registration. The module may declare the plugin-API versions it supports,
``GENFW_PLUGIN_API = ">=1.1,<2"`` (``genfw.PLUGIN_API``; CHANGELOG.md).
"""

import pluggy

hookspec = pluggy.HookspecMarker("genfw")
hookimpl = pluggy.HookimplMarker("genfw")


@hookspec
def genfw_register(registry):
    """Register components by calling ``registry.register(kind, name, target, description=...)``."""
