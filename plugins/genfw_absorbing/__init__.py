"""Built-in plugin genfw_absorbing."""
