"""Tiny random-weight models and a tiny lm-eval task for the eval and report tests."""

from __future__ import annotations

from pathlib import Path


TASK_NAME = "sleb_tiny_mc"

# Multiple choice with an obvious answer; the choices differ in length so acc and acc_norm can differ.
# lm-eval puts its target delimiter (a space) between the question and each choice.
TASK_ROWS = [
    {"question": "The sky on a clear day is", "choices": ["blue.", "a sandwich made of old stone."], "answer": 0},
    {"question": "Two plus two is", "choices": ["seven purple elephants.", "four."], "answer": 1},
    {"question": "Water is", "choices": ["wet.", "a prime number larger than seven."], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["a loud trumpet in the rain.", "cold."], "answer": 1},
    {"question": "Cats are", "choices": ["animals.", "made of glass and copper wire."], "answer": 0},
]

def write_task(folder: Path) -> Path:
    """A multiple-choice lm-eval task (JSONL data + YAML) under `folder`; returns the folder."""
    from sleb.evaluate import write_local_task

    return write_local_task(folder, TASK_NAME, TASK_ROWS)


def offline_tokenizer():
    """The offline model's tokenizer (SmolLM2; adds no BOS)."""
    from transformers import AutoTokenizer

    from sleb.loading import local_checkpoint

    return AutoTokenizer.from_pretrained(local_checkpoint("smollm2-135m"))


def tiny_llama(tokenizer, layers: int = 4, seed: int = 0, hidden: int = 64):
    """A random-weight Llama with the tokenizer's vocabulary, in eval mode."""
    from tiny_models import tiny_config, tiny_model

    return tiny_model(tiny_config(vocab_size=len(tokenizer), layers=layers, context=512, hidden=hidden, tie=True,
                                  bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id), seed=seed)


def save_model(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SAMPLE_TEXT = (
    "Pruning removes whole transformer blocks from a language model. The remaining blocks still "
    "see the same hidden states, so the model keeps working, if a little worse. "
)


def write_text(path: Path, repeats: int = 16) -> Path:
    """A small English .txt file (a local text spec)."""
    words = SAMPLE_TEXT.split()
    lines = [" ".join(words[i % len(words):] + words[: i % len(words)]) for i in range(repeats)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
