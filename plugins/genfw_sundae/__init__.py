"""Built-in plugin genfw_sundae."""
