"""Two tokenizer families built here, no downloads: a byte-level BPE (GPT-2 / Llama-3 / Qwen style)
and a SentencePiece-style BPE (Metaspace "▁", byte fallback ``<0xNN>``, Llama-2 style), both as
transformers ``PreTrainedTokenizerFast``. Small vocabularies, so CJK characters and emoji are split
across tokens (byte-level) or fall back to bytes (SentencePiece)."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS = ["hello", "world", "help", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café",
         "naïve", "wörld", "日本語", "のテキスト", "東京", "🙂", "🎉", "x", "42", "3.14", "  ", "!", ",", "tokenizer",
         "distill"]

# what the tests encode: ASCII, 4-byte emoji, CJK, accents, leading and repeated spaces
TEXTS = ["hello world", "  Hello, wörld! 🙂", "日本語のテキスト", "  two  spaces  ", "café naïve 🎉🎉",
         "The quick brown fox jumps over the lazy dog.", " leading", "東京 42 3.14", "a\nb\tc",
         "🙂"]


def training_texts(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


@pytest.fixture(scope="session")
def byte_level() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(training_texts(), trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", name_or_path="test-byte-level")


@pytest.fixture(scope="session")
def sentencepiece() -> PreTrainedTokenizerFast:
    """Trained as BPE over Metaspace pieces with a small alphabet, then rebuilt with the 256
    ``<0xNN>`` pieces and byte_fallback, as SentencePiece models are."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace
    trained.train_from_iterator(training_texts(), trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "</s>"],
                                                                     limit_alphabet=45))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    sp = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    sp.add_special_tokens(["<unk>", "</s>"])
    sp.pre_tokenizer = metaspace
    sp.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="always"),
                                    decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>",
                                   name_or_path="test-sentencepiece")
