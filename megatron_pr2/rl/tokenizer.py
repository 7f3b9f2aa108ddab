# SentencePiece tokenizer trained locally on the task corpus (no downloads).
#
# Digits are split into single pieces (split_digits) so that arithmetic is learnable by a tiny
# model and every prompt of the task has the same token length. Ids: pad=0, unk=1, bos=2, eos=3.
# The model's embedding table is padded to `padded_vocab_size` (a multiple of 64, Megatron's
# make-vocab-size-divisible-by convention); ids >= vocab_size are never produced by encode().

import io
import os
from typing import List, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TaskTokenizer:
    """Thin wrapper around a SentencePieceProcessor with the demo's special ids."""

    def __init__(self, model_file: str):
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        if (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (
            PAD_ID,
            UNK_ID,
            BOS_ID,
            EOS_ID,
        ):
            raise ValueError(f"tokenizer {model_file} does not use pad/unk/bos/eos = 0/1/2/3")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def padded_vocab_size(self, divisible_by: int = 64) -> int:
        return -(-self.vocab_size // divisible_by) * divisible_by

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids, stopping at the first EOS and ignoring pad / out-of-vocabulary ids."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID) or i >= self.vocab_size:
                continue
            out.append(i)
        return self.sp.decode(out)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID


def train_tokenizer(corpus: Sequence[str], model_prefix: str, vocab_size: int = 64) -> str:
    """Train a BPE SentencePiece model on `corpus` and write `<model_prefix>.model`.

    vocab_size is an upper bound (hard_vocab_limit=False): the arithmetic corpus has only a
    few distinct non-digit pieces, so the learned vocabulary is usually smaller.
    Returns the path of the .model file. Deterministic for a given corpus.
    """
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        split_digits=True,
        add_dummy_prefix=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        minloglevel=2,
    )
    path = model_prefix + ".model"
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
    return path
