"""
Accuracy of a chat model on a task (anything with len(), [i] -> conversation, evaluate(conversation, answer)),
shared by chat_eval, chat_sft and chat_rl. Categorical tasks (ARC, MMLU): one forward per batch, the answer is the
argmax of the first assistant position's logits over the problem's letters. Generative tasks (GSM8K, HumanEval,
SpellingBee): Engine samples, pass@k (any of the first k samples passes). FittingProblems leaves out the problems
longer than a model's context. Problems are split across ranks and the counts all-reduced.
"""

import torch

from nanochat.batch_engine import generate_many
from nanochat.common import get_dist_info, all_reduce_sum


# random-guess accuracy of each chat benchmark: 4-way multiple choice, 0 for open-ended generation
CHAT_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                  "SpellingBee": 0.0}


def chatcore(accuracies, baselines=CHAT_BASELINES):
    """ChatCORE: mean of (acc - baseline) / (1 - baseline), 0 = guessing, 1 = perfect. None unless every
    benchmark of `baselines` is in `accuracies` (a partial mean is not comparable)."""
    if not all(name in accuracies for name in baselines):
        return None
    centered = [(accuracies[name] - b) / (1.0 - b) for name, b in baselines.items()]
    return sum(centered) / len(centered)


class FittingProblems:
    """The first `max_problems` problems of a task whose prompt fits the context (`max_len` tokens); longer
    ones are skipped and counted in `skipped`. Quacks like the task (len, [i], evaluate) for the evaluations."""

    def __init__(self, task, tokenizer, max_len, max_problems=None):
        self.task = task
        n = len(task) if max_problems is None else min(len(task), max_problems)
        self.indices = [i for i in range(n) if len(tokenizer.render_for_completion(task[i])) <= max_len]
        self.skipped = n - len(self.indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.task[self.indices[i]]

    def evaluate(self, conversation, answer):
        return self.task.evaluate(conversation, answer)


def _all_reduce_counts(counts, device):
    """A list of ints summed over ranks."""
    return all_reduce_sum(torch.tensor(counts, dtype=torch.long, device=device)).tolist()


def letter_token_ids(tokenizer, letters, cache):
    ids = []
    for letter in letters:
        if letter not in cache:
            enc = tokenizer.encode(letter)
            if len(enc) != 1:
                raise ValueError(f"answer letter {letter!r} is not a single token ({enc})")
            cache[letter] = enc[0]
        ids.append(cache[letter])
    return ids


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size=8, max_problems=None, device=None):
    """Accuracy in [0, 1] of the letter the model puts most mass on."""
    device = device or next(model.parameters()).device
    _, rank, _, world_size = get_dist_info()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    bos = tokenizer.get_bos_token_id()
    cache, passed, total = {}, 0, 0
    for b in range(0, n, batch_size)[rank::world_size]:
        convs = [task[i] for i in range(b, min(b + batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        width = max(len(p) for p in prompts)
        x = torch.full((len(prompts), width), bos, dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        logits = model(x.to(device))  # (B, T, V)
        for i, (conv, p) in enumerate(zip(convs, prompts)):
            ids = letter_token_ids(tokenizer, conv["letters"], cache)
            scores = logits[i, len(p) - 1, ids]
            answer = conv["letters"][int(scores.argmax())]
            passed += int(task.evaluate(conv, answer))
            total += 1
    passed, total = _all_reduce_counts([passed, total], device)
    return passed / max(total, 1)


def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        max_problems=None, device=None, verbose=False):
    """pass@num_samples in [0, 1] over the first max_problems problems."""
    return pass_at_k(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k, max_problems, device,
                     verbose)[-1]


@torch.no_grad()
def pass_at_k(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
              max_problems=None, device=None, verbose=False):
    """[pass@1, ..., pass@num_samples] over the first max_problems problems: pass@k is the fraction of problems
    with a passing answer among their first k samples, seeded by the problem's index. One sample per problem:
    all of them through batch_engine.generate_many (continuous batching, graded as they finish); several: one
    generate_batch call per problem, its samples sharing the prompt's prefill."""
    # the all-reduce needs a tensor on the backend's device (NCCL: the GPU the model sits on)
    device = torch.device(device) if device is not None else next(engine.model.parameters()).device
    _, rank, _, world_size = get_dist_info()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    indices = range(rank, n, world_size)
    convs = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(conv) for conv in convs]
    sampling = dict(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    if num_samples == 1:
        samples = ([c] for c in generate_many(engine, prompts, seeds=list(indices), **sampling))
    else:
        samples = ([r[len(p):] for r in engine.generate_batch(p, num_samples=num_samples, seed=i, **sampling)[0]]
                   for i, p in zip(indices, prompts))
    passed, total = [0] * num_samples, 0  # passed[k - 1]: problems passed within their first k samples
    for conv, completions in zip(convs, samples):
        # the first passing sample; the later ones need no grading (HumanEval's grading runs code)
        first = next((j for j, c in enumerate(completions) if task.evaluate(conv, tokenizer.decode(c))), num_samples)
        passed = [p + (k >= first) for k, p in enumerate(passed)]
        total += 1
        if verbose:
            print(f"\r[rank {rank}] {passed[-1]}/{total} ({100 * passed[-1] / total:.1f}%)", end="", flush=True)
    if verbose:
        print()
    *passed, total = _all_reduce_counts([*passed, total], device)
    return [p / max(total, 1) for p in passed]
