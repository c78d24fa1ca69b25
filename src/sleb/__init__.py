"""sleb: remove redundant transformer blocks from causal LMs (SLEB, Song et al., ICML 2024).

The pipeline, one function per stage::

    model, tokenizer = sleb.load("smollm2-135m")
    calib = sleb.calibration(tokenizer, "gensim-wiki", nsamples=16, seqlen=256, seed=0)
    result = sleb.search(model, calib, num_remove=6)
    sleb.remove_blocks(model, result.removed)
    sleb.save(model, tokenizer, "out/", result)
"""

from .data import calibration
from .evaluate import perplexity
from .errors import SlebError
from .export import remove_blocks, save
from .models import load
from .search import SearchResult, search

__all__ = ["load", "calibration", "search", "SearchResult", "remove_blocks", "save", "perplexity", "SlebError"]
__version__ = "0.1.0"
