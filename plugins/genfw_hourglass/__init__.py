"""Built-in plugin genfw_hourglass."""
