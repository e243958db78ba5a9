"""Built-in plugin genfw_maskgit: the MaskGIT prior."""
