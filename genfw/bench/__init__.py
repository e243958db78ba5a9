"""``genfw bench``: how fast a recipe's or a model's sampling runs, against this machine's limit.

The papers sell speed (megapixel-SUNDAE: a 1024x1024 sample in about 2 s on a GTX 1080Ti with
100 steps plus VQ-GAN decoding), so genfw measures it the same way on any machine:

* prior forward ms at batch B, its FLOPs (counted with ``FlopCounterMode``, attention included),
  the achieved FLOP/s, and that as a fraction of this process's practical matmul peak in the same
  dtype: the best warm, pre-allocated ``torch.mm(a, b, out=c)`` over several sizes, measured just
  before and just after the model (the larger counts; both are reported; every dtype on CUDA);
* sampling ms per step and per image at the recipe's step count (``prior.sample`` with the recipe's
  sampler params), split into the backbone's own time (every backbone call timed while sampling)
  and the sampler's overhead (the rest of the loop); the step over a forward measured in the same
  repeat; tokenizer decode ms per image, images per second end to end, and peak memory.

Forwards and sampling runs alternate: each repeat times one forward of every prior and then one
sampling run, so slow phases of a loaded machine hit both alike. Every time is reported as the
median with its min and max over ``repeats`` (all values are in the JSON), after a warm-up,
synchronised on CUDA (the backbone's time inside sampling and the matmuls: CUDA events). A recipe is
benchmarked with random weights built on the target device (nothing is trained and no data is
read); a bundle or run directory with its trained weights. Sampling runs exactly as
:func:`genfw.sampling.generate` does: ``torch.inference_mode``, bf16/fp16 autocast on CUDA (fp32 on
CPU unless bf16 is asked for), channels-last convolutional decoders on CUDA, and optionally
``torch.compile``d backbones.

Where it lives: :mod:`~genfw.bench.run` (:func:`bench`: the order of the measurements and the
record), :mod:`~genfw.bench.models` (what runs: a recipe's or a model's tokenizer and priors),
:mod:`~genfw.bench.timing` (clocks, spreads, FLOPs, memory), :mod:`~genfw.bench.matmul` (the
matmul peak) and :mod:`~genfw.bench.tables` (:func:`print_table`); this package re-exports
their public names.
"""

from genfw.bench.matmul import (
    CPU_MATMUL_SIZES,
    CUDA_MATMUL_SIZES,
    MATMUL_METHOD,
    MAX_MATMUL_SIZE,
    check_matmul_sizes,
    matmul_peak,
    matmul_rates,
    peak_precisions,
)
from genfw.bench.models import BenchModels, compile_backbones, load_models
from genfw.bench.run import bench
from genfw.bench.tables import print_table
from genfw.bench.timing import (
    DTYPES,
    PRECISIONS,
    Stopwatch,
    autocast,
    forward_flops,
    forward_inputs,
    resolve_precision,
    spread,
    synchronize,
    timed_backbone,
)

__all__ = [
    "CPU_MATMUL_SIZES", "CUDA_MATMUL_SIZES", "DTYPES", "MATMUL_METHOD", "MAX_MATMUL_SIZE", "PRECISIONS",
    "BenchModels", "Stopwatch", "autocast", "bench", "check_matmul_sizes", "compile_backbones", "forward_flops",
    "forward_inputs", "load_models", "matmul_peak", "matmul_rates", "peak_precisions", "print_table",
    "resolve_precision", "spread", "synchronize", "timed_backbone",
]
