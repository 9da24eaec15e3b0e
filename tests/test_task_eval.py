"""
nanochat/task_eval.py: categorical eval with a stub model whose logits the test controls, generative eval
with a scripted engine, the rank split, and ChatCORE against hand-computed and published numbers.
"""

import os
from types import SimpleNamespace

import pytest
import torch

import nanochat.task_eval as task_eval
from nanochat.task_eval import (run_categorical_eval, run_generative_eval, pass_at_k, chatcore, CHAT_BASELINES,
                                FittingProblems)
from nanochat.tokenizer import RustBPETokenizer
from tasks.common import mc_conversation, evaluate_letter


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return RustBPETokenizer.from_directory(os.path.join(tiny_tokenizer_dir, "tokenizer"))


class ListTask:
    """A task over a fixed list of conversations that records which problems were read."""

    def __init__(self, convs, eval_type, evaluate):
        self.convs, self.eval_type, self._evaluate = convs, eval_type, evaluate
        self.read = []

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        self.read.append(i)
        return self.convs[i]

    def evaluate(self, conv, answer):
        return self._evaluate(conv, answer)

# -----------------------------------------------------------------------------
# categorical

# problem i: correct answer ANSWERS[i], letter the stub model prefers PICKS[i] (problem 5 has 3 choices)
ANSWERS = ["A", "B", "C", "D", "A", "B", "C"]
PICKS = ["A", "B", "D", "D", "C", "B", "C"]  # right on 0, 1, 3, 5, 6


def mc_task():
    convs = []
    for i, answer in enumerate(ANSWERS):
        letters = ["A", "B", "C"] if i == 5 else ["A", "B", "C", "D"]
        question = "the cat sees the house " * (i % 3 + 1) + f"number {i}?"  # unequal lengths -> padding
        convs.append(mc_conversation(question, letters, [f"choice {c}" for c in letters], answer))
    return ListTask(convs, "categorical", evaluate_letter)


def hand_accuracy(indices):
    return sum(ANSWERS[i] == PICKS[i] for i in indices) / len(indices)


class LetterStub(torch.nn.Module):
    """
    Logits (B, T, V) that depend only on the tokens up to each position (causal, like a GPT):
    a huge logit on a non-letter decoy token everywhere; at the last position of a known prompt a bump on
    the letter the test chose; everywhere else (padding, earlier positions) a smaller bump on "D" so that
    reading the wrong position gives a different answer.
    """

    def __init__(self, vocab_size, prompt_to_letter, decoy, wrong):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the evaluator a device to read
        self.V, self.prompt_to_letter, self.decoy, self.wrong = vocab_size, prompt_to_letter, decoy, wrong
        self.batch_shapes = []

    def forward(self, idx):
        B, T = idx.shape
        self.batch_shapes.append((B, T))
        logits = torch.zeros(B, T, self.V)
        logits[:, :, self.decoy] = 1000.0
        logits[:, :, self.wrong] = 5.0
        for b in range(B):
            row = idx[b].tolist()
            for t in range(T):
                letter = self.prompt_to_letter.get(tuple(row[:t + 1]))
                if letter is not None:
                    logits[b, t, letter] = 10.0
        return logits


def letter_stub(tok, task):
    letter_id = {c: tok.encode(c)[0] for c in "ABCD"}
    prompts = {tuple(tok.render_for_completion(c)): letter_id[PICKS[i]] for i, c in enumerate(task.convs)}
    decoy = tok.encode(" the")[0]
    assert decoy not in letter_id.values()
    return LetterStub(tok.get_vocab_size(), prompts, decoy, letter_id["D"])


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_categorical_accuracy_matches_hand_count(tok, batch_size):
    task = mc_task()
    model = letter_stub(tok, task)
    acc = run_categorical_eval(task, tok, model, batch_size=batch_size)
    assert acc == pytest.approx(5 / 7) == hand_accuracy(range(7))
    # one forward per batch of at most batch_size rows, each as wide as its longest prompt
    assert [b for b, _ in model.batch_shapes] == [min(batch_size, 7 - s) for s in range(0, 7, batch_size)]
    assert sorted(task.read) == list(range(7))


def test_categorical_max_problems(tok):
    task = mc_task()
    acc = run_categorical_eval(task, tok, letter_stub(tok, task), batch_size=2, max_problems=3)
    assert acc == pytest.approx(hand_accuracy(range(3))) == pytest.approx(2 / 3)
    assert sorted(task.read) == [0, 1, 2]


def test_categorical_only_letters_count(tok):
    """Without the letter restriction the decoy (logit 1000) would win everywhere and no answer would be a letter."""
    task = mc_task()
    model = letter_stub(tok, task)
    model.prompt_to_letter = {}  # no bump anywhere: "D" (logit 5) is the best letter; problem 5 has no D
    acc = run_categorical_eval(task, tok, model, batch_size=4)
    # problem 5 (letters A, B, C): all three letters tie at 0 -> argmax picks the first, "A"; its answer is B
    assert acc == pytest.approx(sum(a == "D" for a in ANSWERS) / 7)


def test_categorical_rejects_multi_token_letter(tok):
    task = mc_task()
    task.convs[0] = dict(task.convs[0], letters=["the house", "B", "C", "D"])
    with pytest.raises(ValueError, match="not a single token"):
        run_categorical_eval(task, tok, letter_stub(tok, task), batch_size=2)


def test_categorical_rank_split(tok, monkeypatch):
    """Ranks take whole batches rank, rank+W, ...; together they read every problem exactly once."""
    reads, counts = [], []
    for rank in range(2):
        monkeypatch.setattr(task_eval, "get_dist_info", lambda rank=rank: (True, rank, rank, 2))
        task = mc_task()
        acc = run_categorical_eval(task, tok, letter_stub(tok, task), batch_size=2)
        reads.append(sorted(task.read))
        counts.append(acc * len(task.read))  # no process group: the counts are this rank's own
    assert reads == [[0, 1, 4, 5], [2, 3, 6]]
    assert sum(counts) == pytest.approx(5)

# -----------------------------------------------------------------------------
# generative


class ScriptedEngine:
    """generate_batch returning prompt + scripted completion tokens; records every call's arguments."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.calls.append(dict(num_samples=num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                               seed=seed))
        completions = self.script[tuple(tokens)][:num_samples]
        results = [list(tokens) + self.tok.encode(c) for c in completions]
        masks = [[0] * len(tokens) + [1] * (len(r) - len(tokens)) for r in results]
        return results, masks


@pytest.fixture(autouse=True)
def scripted_generate_many(monkeypatch):
    """One sample per problem goes through batch_engine.generate_many: here the scripted engine's, one prompt at
    a time (tests/test_engine.py checks the real one against generate_batch)."""
    def generate_many(engine, prompts, seeds, max_tokens=None, temperature=1.0, top_k=None):
        for tokens, seed in zip(prompts, seeds):
            results, _ = engine.generate_batch(tokens, 1, max_tokens, temperature, top_k, seed)
            yield results[0][len(tokens):]
    monkeypatch.setattr(task_eval, "generate_many", generate_many)


# samples per problem: pass@2 passes 0, 2, 3; pass@1 only 2, 3
SAMPLES = [["wrong", "right 0"], ["wrong", "also wrong"], ["right 2", "wrong"], ["right 3", "right 3"]]


def word_task(tok, graded=None):
    """The four problems of SAMPLES; `graded` (a list) collects every answer graded, in order."""
    convs = [{"messages": [{"role": "user", "content": f"say right {i}"},
                           {"role": "assistant", "content": f"right {i}"}]} for i in range(4)]

    def grade(conv, text):
        if graded is not None:
            graded.append(text)
        return int(text == conv["messages"][-1]["content"])
    task = ListTask(convs, "generative", grade)
    script = {tuple(tok.render_for_completion(c)): SAMPLES[i] for i, c in enumerate(convs)}
    return task, ScriptedEngine(tok, script)


def test_generative_pass_at_n(tok):
    task, engine = word_task(tok)
    acc = run_generative_eval(task, tok, engine, num_samples=2, max_new_tokens=7, temperature=0.5, top_k=3,
                              device="cpu")
    assert acc == pytest.approx(3 / 4)
    assert all(c["num_samples"] == 2 and c["max_tokens"] == 7 and c["temperature"] == 0.5 and c["top_k"] == 3
               for c in engine.calls)
    assert len({c["seed"] for c in engine.calls}) == 4  # each problem samples with its own seed

    task, engine = word_task(tok)
    assert run_generative_eval(task, tok, engine, num_samples=1, device="cpu") == pytest.approx(2 / 4)


def test_pass_at_k_curve_and_lazy_grading(tok):
    graded = []
    task, engine = word_task(tok, graded)
    # first passing sample per problem: 1, none, 0, 0 -> pass@1 = 2/4, pass@2 = 3/4
    assert pass_at_k(task, tok, engine, num_samples=2, device="cpu") == pytest.approx([2 / 4, 3 / 4])
    assert graded == ["wrong", "right 0", "wrong", "also wrong", "right 2", "right 3"]  # none after a pass


def test_generative_max_problems(tok):
    task, engine = word_task(tok)
    assert run_generative_eval(task, tok, engine, num_samples=2, max_problems=2, device="cpu") == pytest.approx(1 / 2)
    assert sorted(task.read) == [0, 1] and len(engine.calls) == 2


def test_generative_rank_split(tok, monkeypatch):
    reads = []
    for rank in range(3):
        monkeypatch.setattr(task_eval, "get_dist_info", lambda rank=rank: (True, rank, rank, 3))
        task, engine = word_task(tok)
        run_generative_eval(task, tok, engine, num_samples=2, device="cpu")
        reads.append(sorted(task.read))
    assert reads == [[0, 3], [1], [2]]


def test_generative_with_gsm8k(tok, tiny_data_dir, monkeypatch):
    """The real GSM8K grader on the fixture rows: '#### <answer>' passes, another number fails."""
    monkeypatch.setenv("NANOCHAT_DATA_DIR", tiny_data_dir)
    from tasks.gsm8k import GSM8K, extract_answer
    task = GSM8K("main", "test")
    script = {}
    for i in range(3):
        conv = task[i]
        answer = extract_answer(conv["messages"][-1]["content"][-1]["text"])
        good, bad = f"So the answer is\n#### {answer}", f"#### {int(answer) + 1}"
        script[tuple(tok.render_for_completion(conv))] = [good, bad] if i != 1 else [bad, bad]
    engine = ScriptedEngine(tok, script)
    assert run_generative_eval(task, tok, engine, num_samples=2, max_problems=3, device="cpu") == pytest.approx(2 / 3)

# -----------------------------------------------------------------------------
# ChatCORE


def test_chatcore_by_hand():
    accs = {"ARC-Easy": 0.25, "ARC-Challenge": 0.40, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.0, "SpellingBee": 0.5}
    # centered: 0, 0.2, 1, 0.1, 0, 0.5 -> mean 1.8 / 6
    assert chatcore(accs) == pytest.approx(0.3)
    assert chatcore({name: 1.0 for name in CHAT_BASELINES}) == pytest.approx(1.0)
    assert chatcore({name: b for name, b in CHAT_BASELINES.items()}) == pytest.approx(0.0)
    del accs["SpellingBee"]
    assert chatcore(accs) is None  # a partial list is not comparable


def test_chatcore_matches_published_report_card():
    """The published report card of nanochat's first speedrun: 5-task ChatCORE (no SpellingBee) for MID and SFT."""
    five = {k: v for k, v in CHAT_BASELINES.items() if k != "SpellingBee"}
    mid = {"ARC-Challenge": 0.2875, "ARC-Easy": 0.3561, "GSM8K": 0.0250, "HumanEval": 0.0671, "MMLU": 0.3111}
    sft = {"ARC-Challenge": 0.2807, "ARC-Easy": 0.3876, "GSM8K": 0.0455, "HumanEval": 0.0854, "MMLU": 0.3151}
    assert round(chatcore(mid, five), 4) == 0.0730
    assert round(chatcore(sft, five), 4) == 0.0884


class LengthTask:
    """Problem i has a prompt of lengths[i] tokens."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"n": self.lengths[i], "i": i}

    def evaluate(self, conv, answer):
        return answer == conv["i"]


def test_fitting_problems_skip_and_count_overlong_prompts():
    tok = SimpleNamespace(render_for_completion=lambda conv: [0] * conv["n"])
    problems = FittingProblems(LengthTask([5, 11, 10, 30, 2, 99]), tok, max_len=10, max_problems=5)
    assert problems.skipped == 2  # 11 and 30; the sixth problem is beyond max_problems
    assert len(problems) == 3 and [problems[i]["i"] for i in range(3)] == [0, 2, 4]
    assert problems.evaluate(problems[1], 2) and not problems.evaluate(problems[1], 1)
