"""sleb: remove redundant transformer blocks from causal LMs (SLEB, Song et al., ICML 2024).

The pipeline, one function per stage::

    model, tokenizer = sleb.load("smollm2-135m")
    calib = sleb.calibration(tokenizer, "gensim-wiki", nsamples=16, seqlen=256, seed=0)
    result = sleb.search(model, calib, num_remove=6)
    sleb.compensate(model, calib, result.removed)   # optional: fold a fitted linear map (ReplaceMe)
    sleb.remove_blocks(model, result.removed)
    sleb.save(model, tokenizer, "out/", result)

or all of it in one call, as `sleb prune` does::

    config = sleb.PruneConfig("smollm2-135m", "out/", sleb.Budget(ratio=0.2),
                              calibration=sleb.Calibration("gensim-wiki", nsamples=16, seqlen=256),
                              racing=sleb.Racing())   # None (the default): the exact search
    sleb.prune(config)

Evaluation and reporting::

    sleb.perplexity(model, tokenizer, "gensim-wiki", seqlen=2048)   # the paper's protocol
    sleb.zero_shot(model, tokenizer, ["piqa", "arc_easy"])          # lm-eval, needs sleb[eval]
    sleb.write_local_task("tasks/", "mine", rows)                   # your own multiple-choice task for it
    sleb.write_report("out/")                                        # report.md + PNGs of the search

and `sleb eval` / `sleb bench` / `sleb compare` as one call each::

    rows = sleb.run_eval(sleb.EvalConfig(["smollm2-135m", "out/"], ["gensim-wiki"], json_path="eval.json"))
    result = sleb.run_bench(sleb.BenchJob(["smollm2-135m", "out/"], json_path="bench.json"))
    table = sleb.run_compare(sleb.CompareJob("smollm2-135m", "cmp/", calibration=sleb.Calibration("gensim-wiki"),
                                             eval_specs=["gensim-lee"]))
"""

from .bench import BenchJob, run_bench
from .compare import CompareJob, run_compare
from .compensate import compensate
from .config import (Budget, Calibration, Compensation, EvalConfig, HeldOut, PruneConfig, Racing, Refinement,
                     SearchOptions)
from .data import calibration
from .errors import BadInput, CheckFailed, SlebError
from .eval_table import ModelEval, run_eval
from .evaluate import mean_accuracy, perplexity, write_local_task, zero_shot
from .export import save
from .loading import load
from .pipeline import prune
from .plots import plot_report
from .report import write_report
from .result import SearchResult
from .saver import save_gguf
from .search import search
from .units import remove_blocks

__all__ = [
    "load", "calibration", "search", "SearchResult", "remove_blocks", "save", "save_gguf", "perplexity", "SlebError",
    "zero_shot", "mean_accuracy", "ModelEval", "plot_report", "write_report", "prune", "Budget", "BadInput",
    "CheckFailed", "compensate", "write_local_task", "PruneConfig", "Calibration", "Compensation", "HeldOut",
    "Racing", "Refinement", "SearchOptions", "EvalConfig", "run_eval", "BenchJob", "run_bench",
    "CompareJob", "run_compare",
]
__version__ = "0.1.0"
