"""Built-in tokenizers: pixels, VQ-VAE, hierarchical VQ-VAE-2 and VQ-GAN."""
