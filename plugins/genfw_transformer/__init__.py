"""Built-in plugin genfw_transformer."""
