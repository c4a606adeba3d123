"""The lab model's tokenizer: CLIP's byte-level BPE with merges that build each word of the lab captions
whole, so every word is one token and the token ids never depend on the process."""
import os

from lab.scenes import COLORS, RELATIONS, SHAPES
from model.text import write_tokenizer

WORDS = ("a", "of", "to", "the", *COLORS, *SHAPES, *" ".join(RELATIONS).split())
SHIPPED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")   # the shipped weights' own



def lab_merges(words=WORDS):
    """BPE merges that build each word, longest words first (so no shorter word's merge splits one), ties
    in the order given. Never iterate a set here: its order changes with the hash seed of each process,
    and with it the token ids that a trained text encoder depends on."""
    merges = []
    for word in sorted(dict.fromkeys(words), key=len, reverse=True):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for k in range(1, len(symbols)):
            pair = ("".join(symbols[:k]), symbols[k])
            if pair not in merges:
                merges.append(pair)
    return merges


def write_lab_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    return write_tokenizer(folder, lab_merges(), compact=True)
