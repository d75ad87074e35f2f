"""Training side of lungnode: synthetic chest CT phantoms (and, later, datasets, trainer, registry)."""

from training.synth import (
    Phantom,
    SynthSpec,
    SynthSpecError,
    SynthStudy,
    kernel_is_sharp,
    make_phantom,
    write_study,
)

__all__ = [
    "Phantom",
    "SynthSpec",
    "SynthSpecError",
    "SynthStudy",
    "kernel_is_sharp",
    "make_phantom",
    "write_study",
]
