# RL demo: arithmetic task, reward function and the locally trained SentencePiece tokenizer.

import random

import pytest

from megatron_pr2.rl.task import ArithmeticTask, Problem, TaskConfig, exact_match, score_answer
from megatron_pr2.rl.tokenizer import BOS_ID, EOS_ID, PAD_ID, TaskTokenizer, train_tokenizer


def test_problem_text_and_answer():
    p = Problem(a=7, b=45, op="-", num_digits=2)
    assert p.prompt == "07-45="
    assert p.answer == "-38"
    q = Problem(a=99, b=99, op="+", num_digits=2)
    assert q.prompt == "99+99=" and q.answer == "198"


def test_sampling_is_seeded_and_in_range():
    task = ArithmeticTask(TaskConfig(num_digits=3, ops="+-"))
    a = task.sample(random.Random(5), 200)
    b = task.sample(random.Random(5), 200)
    assert a == b
    assert a != task.sample(random.Random(6), 200)
    for p in a:
        assert 0 <= p.a < 1000 and 0 <= p.b < 1000 and p.op in "+-"
        assert len(p.prompt) == task.config.prompt_chars
        assert len(p.answer) <= task.config.max_answer_chars
        # The answer is the true result of the prompt's arithmetic (independent evaluation).
        lhs = p.prompt[:-1]
        x, y = lhs.split("+") if p.op == "+" else lhs.split("-")
        assert int(p.answer) == (int(x) + int(y) if p.op == "+" else int(x) - int(y))
    assert {p.op for p in a} == {"+", "-"}


@pytest.mark.parametrize(
    "ref,completion,partial,expected",
    [
        ("357", "357", 0.5, 1.0),
        ("357", " 357 ", 0.5, 1.0),  # surrounding whitespace is ignored
        ("357", "358", 0.5, 0.5 * 2 / 3),  # two of three digits right
        ("357", "57", 0.5, 0.5 * 2 / 3),  # right-aligned: ' 57' vs '357'
        ("-38", "38", 0.5, 0.5 * 2 / 3),  # missing sign
        ("-38", "-38", 0.5, 1.0),
        ("357", "abc", 0.5, 0.0),  # not an integer
        ("357", "", 0.5, 0.0),
        ("357", "0357", 0.5, 0.0),  # leading zero is not a well-formed integer
        ("357", "358", 0.0, 0.0),  # exact-match reward
        ("0", "0", 0.5, 1.0),
    ],
)
def test_score_answer(ref, completion, partial, expected):
    assert score_answer(ref, completion, partial) == pytest.approx(expected, abs=1e-12)


def test_wrong_answers_score_below_one():
    rng = random.Random(0)
    for _ in range(500):
        ref = str(rng.randint(-999, 1998))
        got = str(rng.randint(-999, 1998))
        r = score_answer(ref, got, 0.9)
        assert (r == 1.0) == (got == ref)
        assert 0.0 <= r <= 1.0
    assert exact_match("12", "12") == 1.0 and exact_match("12", "13") == 0.0


def test_task_config_validation():
    with pytest.raises(ValueError, match="num_digits"):
        TaskConfig(num_digits=0)
    with pytest.raises(ValueError, match="ops"):
        TaskConfig(ops="*")
    with pytest.raises(ValueError, match="partial_credit"):
        TaskConfig(partial_credit=1.0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    task = ArithmeticTask(TaskConfig(num_digits=2))
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    train_tokenizer(task.corpus(seed=0, n=4000), prefix, vocab_size=64)
    return TaskTokenizer(prefix + ".model")


def test_tokenizer_round_trip(tokenizer):
    task = ArithmeticTask(TaskConfig(num_digits=2))
    for line in task.corpus(seed=1, n=300):
        ids = tokenizer.encode(line)
        assert tokenizer.decode(ids) == line
        assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_specials_and_digit_split(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    # Digits are single pieces, so every prompt has one token per character.
    task = ArithmeticTask(TaskConfig(num_digits=2))
    for p in task.sample(random.Random(3), 100):
        assert len(tokenizer.encode(p.prompt)) == len(p.prompt)
        assert len(tokenizer.encode(p.answer)) == len(p.answer)
    # decode stops at EOS and skips pad / BOS / padded-vocabulary ids.
    ids = [BOS_ID] + tokenizer.encode("12") + [EOS_ID] + tokenizer.encode("9")
    assert tokenizer.decode(ids) == "12"
    assert tokenizer.decode(tokenizer.encode("3") + [PAD_ID, tokenizer.vocab_size + 5]) == "3"
    assert tokenizer.padded_vocab_size() % 64 == 0
    assert tokenizer.padded_vocab_size() >= tokenizer.vocab_size


def test_tokenizer_training_is_deterministic(tmp_path):
    task = ArithmeticTask(TaskConfig(num_digits=2))
    corpus = task.corpus(seed=0, n=2000)
    a = train_tokenizer(corpus, str(tmp_path / "a"), 64)
    b = train_tokenizer(corpus, str(tmp_path / "b"), 64)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
