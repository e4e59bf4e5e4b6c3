"""Build script for the optional C segmenter; all metadata is in setup.cfg.

``hf_su.tokenization._viterbi`` makes BytePiece encoding several times faster. It is optional: without a C compiler
the package still installs, and BytePiece tokenizers fall back to the ``tokenizers`` backend (same ids, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hf_su.tokenization._viterbi",
            sources=["hf_su/tokenization/_viterbi.c"],
            extra_compile_args=["-O3", "-std=c99"],
            optional=True,
        )
    ]
)
