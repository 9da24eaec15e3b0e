"""
Compare compression (bytes per token) of our tokenizer with GPT-2 and GPT-4 (cl100k_base) on training
text, validation text and a few fixed genre samples. Also measures encode throughput.

    python -m scripts.tok_eval
    NANOCHAT_DATA_DIR=../shared/data python -m scripts.tok_eval

GPT-2/GPT-4 encodings are fetched by tiktoken (network or its cache); offline they are skipped with a note.
"""

import time
import argparse

from nanochat.dataset import parquets_iter_batched
from nanochat.files import install_error_handler
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

parser = argparse.ArgumentParser(description="Evaluate tokenizer compression")
parser.add_argument("--fetch-timeout", type=float, default=20.0, help="seconds to wait for each tiktoken download")
args = parser.parse_args()
install_error_handler()

# -----------------------------------------------------------------------------
# Texts: fixed genre samples (our own) plus the first row group of the train and val splits

news = """The Department of Energy announced on Tuesday a new $2.4 billion program to modernize the nation's
electric grid, aimed at reducing outages during extreme weather. Officials said the funding, drawn from
the 2021 infrastructure law, will go to 58 projects across 44 states. "Americans deserve power they can
count on," the Secretary said at a press briefing in Washington. Utilities must match each federal dollar
with private investment, and the first awards are expected by early next year. Critics argued the plan
does too little for rural cooperatives, which serve about 42 million people but received 9% of the money."""

korean = """대한민국은 동아시아의 한반도 남부에 위치한 민주공화국이다. 수도는 서울특별시이며, 인구는 약 5천만 명이다.
한국어는 한글이라는 고유한 문자로 표기되며, 한글은 1443년 세종대왕이 창제하였다. 한국은 전자, 자동차,
조선 산업이 발달하였고, 최근에는 영화와 음악 같은 문화 콘텐츠로도 세계적인 관심을 받고 있다."""

code = '''class Counter:
    """Counts how often each adjacent pair occurs in a list of token ids."""

    def __init__(self, ids):
        self.counts = {}
        for a, b in zip(ids, ids[1:]):
            self.counts[(a, b)] = self.counts.get((a, b), 0) + 1

    def most_common(self, k=1):
        return sorted(self.counts.items(), key=lambda kv: -kv[1])[:k]


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
'''

math = r"""\documentclass{article}
\usepackage{amsmath,amssymb}
\begin{document}
\begin{theorem}
For every integer $n \geq 1$, $\sum_{k=1}^{n} k^3 = \left( \frac{n(n+1)}{2} \right)^2$.
\end{theorem}
\begin{proof}
By induction on $n$. For $n = 1$ both sides equal $1$. Assume the claim for $n$; then
\[
\sum_{k=1}^{n+1} k^3 = \frac{n^2(n+1)^2}{4} + (n+1)^3 = \frac{(n+1)^2 (n^2 + 4n + 4)}{4}
= \left( \frac{(n+1)(n+2)}{2} \right)^2 .
\]
\end{proof}
\end{document}
"""

science = """Photosynthesis converts light energy into chemical energy stored in glucose. In the thylakoid
membranes, photosystem II absorbs photons near 680 nm and splits water, releasing O2 and passing electrons
along a transport chain that pumps protons into the lumen. The resulting proton gradient drives ATP synthase,
while photosystem I re-energizes electrons to reduce NADP+ to NADPH. In the stroma, the Calvin cycle uses
ATP and NADPH to fix CO2 through the enzyme RuBisCO, producing glyceraldehyde-3-phosphate (G3P)."""

texts = [("news", news), ("korean", korean), ("code", code), ("math", math), ("science", science)]
for split, label in (("train", "fwe-train"), ("val", "fwe-val")):
    try:
        texts.append((label, "\n".join(next(parquets_iter_batched(split)))))
    except (FileNotFoundError, StopIteration) as e:
        print(f"skipping {label}: {e}")

# -----------------------------------------------------------------------------
# Tokenizers

tokenizers = {}
for name, tiktoken_name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
    try:
        tokenizers[name] = RustBPETokenizer.from_pretrained(tiktoken_name, timeout=args.fetch_timeout)
    except Exception as e:
        print(f"NOTE: could not load tiktoken {tiktoken_name!r} ({type(e).__name__}: {str(e)[:120]}); "
              f"it is left out of the comparison")
tokenizers["ours"] = get_tokenizer()

results = {}  # tokenizer name -> text label -> dict(bytes, tokens, ratio)
for name, tok in tokenizers.items():
    print(f"{name} vocab size: {tok.get_vocab_size():,}")
    results[name] = {}
    for label, text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{name}: round trip failed on {label}"
        n_bytes = len(text.encode("utf-8"))
        results[name][label] = dict(bytes=n_bytes, tokens=len(ids), ratio=n_bytes / len(ids))

# -----------------------------------------------------------------------------
# Tables

GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"
report_lines = []


def comparison(baseline):
    print(f"\nComparison with {baseline.upper()}:")
    print("=" * 95)
    print(f"{'Text Type':<10} {'Bytes':<8} {baseline.upper():<15} {'Ours':<15} {'Relative':<12} {'Better':<8}")
    print(f"{'':<10} {'':<8} {'Tokens':<7} {'Ratio':<7} {'Tokens':<7} {'Ratio':<7} {'Diff %':<12}")
    print("-" * 95)
    md = [f"### Comparison with {baseline.upper()}", "",
          f"| Text Type | Bytes | {baseline.upper()} Tokens | {baseline.upper()} Ratio | Ours Tokens | Ours Ratio "
          f"| Relative Diff % |", "|---|---|---|---|---|---|---|"]
    for label, _ in texts:
        b, o = results[baseline][label], results["ours"][label]
        diff = (b["tokens"] - o["tokens"]) / b["tokens"] * 100  # positive: we need fewer tokens
        better = "Ours" if o["ratio"] > b["ratio"] else (baseline.upper() if b["ratio"] > o["ratio"] else "Tie")
        col = GREEN if diff > 0 else RED if diff < 0 else ""
        print(f"{label:<10} {o['bytes']:<8} {b['tokens']:<7} {b['ratio']:<7.2f} {o['tokens']:<7} {o['ratio']:<7.2f} "
              f"{col}{diff:+7.1f}%{RESET if col else ''}     {better:<8}")
        md.append(f"| {label} | {o['bytes']} | {b['tokens']} | {b['ratio']:.2f} | {o['tokens']} | {o['ratio']:.2f} "
                  f"| {diff:+.1f}% |")
    report_lines.extend(md + [""])


for baseline in ("gpt2", "gpt4"):
    if baseline in results:
        comparison(baseline)
if len(results) == 1:
    print("\nOurs alone (GPT-2/GPT-4 encodings unavailable offline):")
    report_lines += ["### Ours (GPT-2/GPT-4 encodings unavailable)", "",
                     "| Text Type | Bytes | Tokens | Ratio |", "|---|---|---|---|"]
    print(f"{'Text Type':<10} {'Bytes':<8} {'Tokens':<8} {'Ratio':<7}")
    for label, _ in texts:
        o = results["ours"][label]
        print(f"{label:<10} {o['bytes']:<8} {o['tokens']:<8} {o['ratio']:<7.2f}")
        report_lines.append(f"| {label} | {o['bytes']} | {o['tokens']} | {o['ratio']:.2f} |")
    report_lines.append("")  # a blank line ends the markdown table (else the next line becomes a row)

# -----------------------------------------------------------------------------
# Encode throughput: batch-encode every document of the first train row groups (up to ~20M chars)

docs = []
try:
    for batch in parquets_iter_batched("train"):
        docs.extend(batch)
        if sum(map(len, docs)) > 20_000_000:
            break
except FileNotFoundError:
    pass
if docs:
    tok = tokenizers["ours"]
    t0 = time.time()
    rows = tok.encode(docs)
    dt = time.time() - t0
    n_tokens, n_chars = sum(map(len, rows)), sum(map(len, docs))
    print(f"\nEncode throughput: {len(docs):,} docs, {n_chars:,} chars -> {n_tokens:,} tokens in {dt:.2f}s "
          f"= {n_tokens / dt / 1e6:.2f}M tokens/s ({n_chars / dt / 1e6:.1f}M chars/s)")
    report_lines.append(f"Encode throughput (batch, 8 threads): {n_tokens / dt / 1e6:.2f}M tokens/s")

get_report().log(section="Tokenizer evaluation", data=["\n".join(report_lines)])
