"""The plugin contract: one hook through which a plugin registers its components.

A plugin is any module exposed through the ``genfw`` entry-point group that implements
``genfw_register``::

    from genfw import hookimpl

    @hookimpl
    def genfw_register(registry):
        registry.register("prior", "muse", "genfw_muse.prior:Muse",
                          description="Muse parallel decoding")

Components are named by ``"module:attr"`` strings (imported only when built, so discovery and
``genfw --help`` stay fast) or by the class itself. Kinds today: tokenizer, backbone, prior,
dataset; new kinds can be added without changing the hook.
"""

import pluggy

hookspec = pluggy.HookspecMarker("genfw")
hookimpl = pluggy.HookimplMarker("genfw")


@hookspec
def genfw_register(registry):
    """Register components by calling ``registry.register(kind, name, target, description=...)``."""
