"""Built-in plugin genfw_autoregressive."""
