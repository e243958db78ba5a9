"""Registration of the built-in tokenizers (cheap to import: classes are named, not imported)."""

from genfw import hookimpl


@hookimpl
def genfw_register(registry):
    registry.register("tokenizer", "pixels", "genfw_vq.pixels:Pixels",
                      description="Each pixel value quantised to v levels is its code (no training)")
    registry.register("tokenizer", "vqvae", "genfw_vq.vqvae:VQVAE",
                      description="VQ-VAE: residual conv encoder/decoder, one code grid (EMA codebook)")
    registry.register("tokenizer", "vqvae2", "genfw_vq.vqvae2:VQVAE2",
                      description="Hierarchical VQ-VAE-2 with 2 or 3 levels (Razavi et al. 2019)")
    registry.register("tokenizer", "vqgan", "genfw_vq.vqgan:VQGAN",
                      description="VQ-GAN (taming-transformers names) with LPIPS, PatchGAN, DiffAugment")
    registry.register("tokenizer", "fsq", "genfw_vq.implicit:FSQGAN",
                      description="vqgan's networks and loss with finite scalar quantization (Mentzer et al. 2023)")
    registry.register("tokenizer", "lfq", "genfw_vq.implicit:LFQGAN",
                      description="vqgan's networks and loss with lookup-free quantization (MAGVIT-v2)")
    registry.register("converter", "taming", "genfw_vq.convert:convert_taming",
                      description="Convert a taming-transformers VQ-GAN .ckpt into a genfw vqgan checkpoint")
    registry.register("converter", "vqvae2", "genfw_vq.convert_vqvae2:convert_vqvae2",
                      description="Convert a rosinality/vq-vae-2-pytorch vqvae_NNN.pt into a genfw vqvae2 tokenizer")
    registry.register("converter", "unleashing-vqgan", "genfw_vq.convert_unleashing:convert_unleashing_vqgan",
                      description="Convert an Unleashing Transformers vqgan_<step>.th into a genfw vqgan tokenizer")
