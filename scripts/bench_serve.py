"""
Benchmark the chat server under concurrent users: 1, 8 and 32 clients stream replies through the official
`openai` client from live servers (uvicorn on 127.0.0.1, one child process per serve mode; each client its own
process, so that the clients' Python work does not queue on one GIL). Each load runs against the
continuous-batching server (`--serve-mode batch`) and the one-request-per-replica server (`worker`), one after
the other at each client count, so both see the same machine conditions. Reported per mode and client count:
aggregate generated tok/s (the server's own token count over the wall time), p50/p95 time to first token
(request sent -> first content chunk) and p50/p95 inter-token latency (the gaps between a reply's chunks),
then the targets: at 8 clients, TTFT p50 and p95 over the single client's p50 (<= 2x, <= 3x) and batch over
worker tok/s (>= 4x). Then the long-prompt run, against the batch server: 7 clients decode long replies, an
8th sends a --long-prompt-token prompt; reported: the worst gap in the 7 streams while it is prefilled (chunked
prefill bounds it by one chunk of the prompt) and its own TTFT.

With --soak=SECONDS it runs a soak test instead, against one batch-mode server: --soak-clients threads send
a mix of streaming and non-streaming requests (random lengths and sampling settings), hang up on a random
share of them mid-reply, and slip in a few hostile bodies that must be refused. It reports requests served,
client disconnects, errors by kind, rows leaked once the load stops (/stats must return to 0 active rows and
an empty queue) and the server's RSS at start, after warm-up (the first fifth) and at the end. It passes (exit
status 0) with no errors, no leaked rows and RSS grown by at most 10% after warm-up.

Launch:
    python -m scripts.bench_serve                          # random d4 model (the recipe's shapes but 2048 context)
    python -m scripts.bench_serve --source sft             # a trained checkpoint from $NANOCHAT_BASE_DIR
    python -m scripts.bench_serve --clients 1,8 --max-tokens 32 --requests 1 --long-prompt 0
    python -m scripts.bench_serve --soak=300               # a 5-minute soak with 16 clients

A random model needs a tokenizer of its vocabulary: the trained one in $NANOCHAT_BASE_DIR/tokenizer if its
size matches, else one trained here in seconds on the pretraining shards (NANOCHAT_DATA_DIR or downloaded).
"""

import os
import sys
import json
import queue
import time
import random
import argparse
import itertools
import threading
import statistics
import collections

parser = argparse.ArgumentParser(description="Benchmark chat_web with concurrent openai clients")
parser.add_argument("--source", type=str, default="", help="checkpoint source base|mid|sft|rl; empty = random model")
parser.add_argument("--model-tag", type=str, default=None, help="model tag to load (default: largest)")
parser.add_argument("--depth", type=int, default=4, help="random model: depth (width = 64 * depth)")
parser.add_argument("--vocab-size", type=int, default=8192, help="random model: vocabulary size")
parser.add_argument("--max-seq-len", type=int, default=2048, help="random model: context (the long prompt must fit)")
parser.add_argument("--clients", type=str, default="1,8,32", help="comma-separated concurrent client counts")
parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (greedy; a reply may stop early)")
parser.add_argument("--max-rows", type=int, default=8, help="batch mode: requests decoded together (the server default)")
parser.add_argument("--modes", type=str, default="batch,worker", help="comma-separated serve modes to compare")
parser.add_argument("--device-type", type=str, default="cpu", help="cuda|cpu|mps")
parser.add_argument("--repeats", type=int, default=1, help="runs of each load, interleaved; medians are reported")
parser.add_argument("--long-prompt", type=int, default=2000, help="prompt tokens of the long-prompt run (0 = skip it)")
parser.add_argument("--long-reply", type=int, default=512, help="long-prompt run: tokens each of the 7 decodes")
parser.add_argument("--soak", type=float, default=0, help="run a soak test of this many seconds instead (see above)")
parser.add_argument("--soak-clients", type=int, default=16, help="soak: concurrent client threads")
parser.add_argument("--soak-disconnect", type=float, default=0.2, help="soak: share of requests hung up mid-reply")
MAX_RSS_GROWTH = 0.10  # soak: the server's RSS may grow at most this much after warm-up

WORDS = ["rivers", "the moon", "bread", "chess", "volcanoes", "music", "bees", "glass", "trains", "salt"]


def random_model(depth, vocab_size, max_seq_len, device, dtype, never=()):
    """A freshly initialised GPT of the CPU recipe's shapes (head dim 64, full windows). The logits of the ids in
    `never` (the special tokens) are 0 while the largest of the others is positive: greedy replies never end early."""
    import torch
    from nanochat.gpt import GPT, config_from_depth
    config = config_from_depth(depth, head_dim=64, max_seq_len=max_seq_len, vocab_size=vocab_size, window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype)
    with torch.no_grad():
        model.lm_head.weight[list(never)] = 0.0
    return model.eval()


def tokenizer_of_size(vocab_size):
    from nanochat.dataset import parquets_iter_batched
    from nanochat.tokenizer import RustBPETokenizer, get_tokenizer
    try:
        tok = get_tokenizer()
        if tok.get_vocab_size() == vocab_size:
            return tok
    except FileNotFoundError:
        pass
    print(f"training a {vocab_size}-token tokenizer for the random model...", flush=True)
    texts = itertools.islice((t for batch in parquets_iter_batched("train") for t in batch), 3000)
    tok = RustBPETokenizer.train_from_iterator(texts, vocab_size)
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"the pretraining text gave only {tok.get_vocab_size()} tokens; pass --vocab-size "
                         f"{tok.get_vocab_size()} or train a tokenizer with scripts.tok_train")
    return tok


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def client_process(index, jobs, results):
    """Client `index`: runs jobs (url, [messages per request], max_tokens, start time) until None, each request's
    result being (send time, [content chunk arrival times]) on the monotonic clock, or the error's repr."""
    from openai import OpenAI
    clients = {}
    while (job := jobs.get()) is not None:
        url, conversations, max_tokens, start = job
        if url not in clients:
            clients[url] = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        client = clients[url]
        time.sleep(max(0.0, start - time.monotonic()))
        out = []
        for messages in conversations:
            try:
                t0 = time.monotonic()
                stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                        temperature=0.0, stream=True)
                out.append((t0, [time.monotonic() for chunk in stream if chunk.choices[0].delta.content]))
            except Exception as e:  # reported after the run
                out.append(repr(e))
        results.put((index, out))


class ClientPool:
    """Client processes, started once and reused by every load (starting one costs a second of CPU)."""

    def __init__(self, ctx, n):
        self.jobs, self.results = [ctx.Queue() for _ in range(n)], ctx.Queue()
        self.procs = [ctx.Process(target=client_process, args=(i, q, self.results), daemon=True)
                      for i, q in enumerate(self.jobs)]
        for p in self.procs:
            p.start()

    def run(self, url, conversations, max_tokens, delays=None):
        """Client i sends conversations[i] (its requests, one after the other), starting delays[i] s from now."""
        start = time.monotonic() + 0.5  # every client is idle and ready by then
        for i, convs in enumerate(conversations):
            self.jobs[i].put((url, convs, max_tokens if isinstance(max_tokens, int) else max_tokens[i],
                              start + (delays[i] if delays else 0.0)))
        results = dict(self.results.get(timeout=3600) for _ in conversations)
        return [results[i] for i in range(len(conversations))], start

    def close(self):
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(10)


def conversation(c, r, text=None):
    return [{"role": "user", "content": text or f"Tell me about {WORDS[(c + r) % len(WORDS)]} ({c}, {r})."}]


def run_load(pool, url, clients, requests, max_tokens):
    """`clients` clients, each streaming `requests` replies in turn: tok/s, TTFT and inter-token percentiles."""
    import httpx
    before = httpx.get(url + "/stats").json()["total_tokens"]
    results, start = pool.run(url, [[conversation(c, r) for r in range(requests)] for c in range(clients)], max_tokens)
    wall = time.monotonic() - start
    tokens = httpx.get(url + "/stats").json()["total_tokens"] - before
    replies = [rep for client in results for rep in client]
    errors = [rep for rep in replies if isinstance(rep, str)]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ttft = [times[0] - t0 for t0, times in replies if times]
    gaps = [b - a for _, times in replies for a, b in zip(times, times[1:])]
    return {"tok_per_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95), "itl_p50": percentile(gaps, 0.5), "itl_p95": percentile(gaps, 0.95)}


def run_long_prompt(pool, url, long_text, reply_tokens, delay=1.0):
    """7 clients decode `reply_tokens` each; `delay` s later an 8th sends `long_text`. The worst gap between
    chunks of the 7 from its send to its first token + 0.1 s, its TTFT, and the 7's median gap outside that."""
    convs = [[conversation(c, 0)] for c in range(7)] + [[conversation(7, 0, long_text)]]
    results, _ = pool.run(url, convs, [reply_tokens] * 7 + [8], delays=[0.0] * 7 + [delay])
    replies = [client[0] for client in results]
    errors = [rep for rep in replies if isinstance(rep, str)]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    sent, times = replies[7]
    lo, hi = sent, times[0] + 0.1
    inside = [b - a for _, ts in replies[:7] for a, b in zip(ts, ts[1:]) if b > lo and a < hi]
    outside = [b - a for _, ts in replies[:7] for a, b in zip(ts, ts[1:]) if b <= lo or a >= hi]
    decoding = sum(1 for _, ts in replies[:7] if ts and ts[0] < lo and ts[-1] > hi)
    return {"worst_gap": max(inside) if inside else float("nan"), "ttft": times[0] - sent,
            "gap_p50_outside": percentile(outside, 0.5), "decoding": decoding}


def long_prompt_text(tok, n_tokens):
    """A user message that renders to about n_tokens prompt tokens."""
    def rendered(text):
        return len(tok.render_for_completion({"messages": conversation(0, 0, text) + [{"role": "assistant",
                                                                                       "content": ""}]}))
    words, text = itertools.cycle(["river", "moon", "bread", "chess", "music", "bees", "glass", "salt"]), ""
    while (n := rendered(text)) < n_tokens:  # a word is a token or two: approach from below
        text += " ".join(next(words) for _ in range(max(1, (n_tokens - n) // 2))) + " "
    return text


# -----------------------------------------------------------------------------
# Soak: mixed load with disconnects against one live server, then a look for leaks

HOSTILE = [b"{not json", b"[" * 5000, json.dumps({"messages": []}).encode(), '{"messages": "\u2200"}'.encode("utf-16"),
           b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}']


def soak_request(client, url, rng, disconnect_share):
    """One random request; returns its outcome: "served", "disconnected" (the client hung up on purpose),
    "refused as expected" (a hostile body answered 4xx JSON), or an error kind."""
    import httpx
    if rng.random() < 0.05:  # a hostile body: must be refused with a 4xx JSON error
        r = client.post(url + "/v1/chat/completions", content=rng.choice(HOSTILE))
        ok = 400 <= r.status_code < 500 and "error" in r.json()
        return "refused as expected" if ok else f"hostile body answered {r.status_code}"
    stream, hang_up = rng.random() < 0.5, rng.random() < disconnect_share
    route = rng.choice(["/v1/chat/completions", "/chat/completions"]) if stream else "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": f"Tell me about {rng.choice(WORDS)} ({rng.random():.3f})."}],
            "max_tokens": rng.randint(4, 128), "temperature": rng.choice([0.0, 0.7, 1.0]), "top_k": rng.choice([0, 50]),
            "stream": stream}
    if not stream:
        try:  # hanging up = giving up on the reply after a random short wait
            r = client.post(url + route, json=body, timeout=rng.uniform(0.05, 0.5) if hang_up else 600)
        except httpx.TimeoutException:
            return "disconnected"
        if r.status_code != 200:
            return f"http {r.status_code}"
        return "served" if r.json()["choices"][0]["finish_reason"] in ("stop", "length") else "bad reply"
    with client.stream("POST", url + route, json=body, timeout=600) as r:
        if r.status_code != 200:
            return f"http {r.status_code}"
        events, stop_after = 0, rng.randint(1, 8) if hang_up else None
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = line[6:]
            if event == "[DONE]" or (event := json.loads(event)) == {"done": True}:
                return "served"
            if "error" in event:
                return "in-band error event"
            events += 1
            if events == stop_after:
                return "disconnected"  # leaving the block closes the connection mid-stream
        return "stream ended without its terminal event"


def soak(args, url, pid):
    """Drive the server at `url` (process `pid`) for args.soak seconds; print the report and return pass/fail."""
    import httpx
    import psutil
    server = psutil.Process(pid)

    def rss():  # MiB, the server's and its engine process's
        return sum(p.memory_info().rss for p in [server] + server.children(recursive=True)) / 2**20
    tally, lock, stop = collections.Counter(), threading.Lock(), threading.Event()
    rss_start, t0 = rss(), time.time()
    warm_until, rss_warm = t0 + args.soak / 5, None

    def client_thread(seed):
        rng = random.Random(seed)
        with httpx.Client(timeout=600) as client:
            while not stop.is_set():
                try:
                    outcome = soak_request(client, url, rng, args.soak_disconnect)
                except Exception as e:  # transport errors, bad JSON...: counted by kind
                    outcome = f"client error {type(e).__name__}"
                with lock:
                    tally[outcome] += 1

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(args.soak_clients)]
    for t in threads:
        t.start()
    while time.time() - t0 < args.soak:
        time.sleep(min(10.0, max(0.0, t0 + args.soak - time.time())))
        if rss_warm is None and time.time() >= warm_until:
            rss_warm = rss()
        stats = httpx.get(url + "/stats", timeout=30).json()
        with lock:
            done = dict(tally)
        print(f"soak {time.time() - t0:5.0f} s: served {done.get('served', 0)}, disconnected "
              f"{done.get('disconnected', 0)}, active rows {stats['active_rows']}, queue {stats['queue_depth']}, "
              f"RSS {rss():.0f} MiB", flush=True)
    stop.set()
    for t in threads:
        t.join(600)
    deadline = time.time() + 60  # cancelled rows are freed at the next decode step: give it a moment
    while (stats := httpx.get(url + "/stats", timeout=30).json())["active_rows"] + stats["queue_depth"] \
            and time.time() < deadline:
        time.sleep(0.2)
    leaked, rss_end = stats["active_rows"] + stats["queue_depth"], rss()
    rss_warm = rss_warm or rss_end
    expected = ("served", "disconnected", "refused as expected")
    errors = {k: v for k, v in tally.items() if k not in expected}
    growth = rss_end / rss_warm - 1
    print(f"soak of {args.soak:.0f} s with {args.soak_clients} clients: {tally['served']} requests served, "
          f"{tally['disconnected']} client disconnects, {tally['refused as expected']} hostile bodies refused")
    print(f"errors by kind: {errors or 'none'}")
    print(f"rows leaked: {leaked} (active rows {stats['active_rows']}, queue {stats['queue_depth']}, target 0)")
    print(f"server RSS: {rss_start:.0f} MiB at start, {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end "
          f"({growth * 100:+.1f}% after warm-up, target <= {MAX_RSS_GROWTH * 100:.0f}%)")
    passed = not errors and leaked == 0 and growth <= MAX_RSS_GROWTH and tally["served"] > 0
    print("soak: PASS" if passed else "soak: FAIL")
    return passed


def server_process(args, mode, urls, done):
    """A child process: load or build the model, serve it in `mode`, report the url, run until `done` is set.
    The server lives in its own process so that the clients' Python work does not compete for its GIL."""
    import torch
    from scripts.chat_web import ServeConfig, create_app, make_replica, serve_in_thread
    from nanochat.common import resolve_precision
    device = torch.device(args.device_type)
    dtype, _, _ = resolve_precision(device.type, training=False, verbose=False)
    try:
        if args.source:
            from nanochat.model_loader import load_model
            model, tok, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, dtype=dtype)
        else:
            tok = tokenizer_of_size(args.vocab_size)
            never = [tok.encode_special(name) for name in tok.get_special_tokens()]
            model = random_model(args.depth, args.vocab_size, args.max_seq_len, device, dtype, never)
    except (FileNotFoundError, ValueError) as e:  # missing data or checkpoint: one line, and the parent stops
        print(f"bench_serve: the {mode} server cannot start: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    cfg = model.config
    print(f"{mode} server: depth {cfg.n_layer}, width {cfg.n_embd}, vocab {cfg.vocab_size}, context "
          f"{cfg.sequence_len}, {'checkpoint ' + args.source if args.source else 'random weights'}, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    long_text = None
    if args.long_prompt and mode == "batch":
        long_text = long_prompt_text(tok, min(args.long_prompt, cfg.sequence_len - args.long_reply - 16))
    sys.stdout = open(os.devnull, "w")  # the server's per-request log is no part of the report
    replica = make_replica(0, device, model, tok, max_rows=1 if mode == "worker" else args.max_rows, max_queue=4096,
                           process=True)  # as chat_web serves: the decode loop in a process of its own
    url, stop = serve_in_thread(create_app([replica], ServeConfig(model_name="bench", serve_mode=mode)))
    urls.put((mode, url, long_text))
    done.wait()
    stop()


def wait_for_server(proc, urls, limit_s=600):
    """The (mode, url, long prompt) a server process reports once it serves; stops at once if it died first."""
    t0 = time.time()
    while time.time() - t0 < limit_s:
        try:
            return urls.get(timeout=0.5)
        except queue.Empty:
            pass
        if not proc.is_alive():
            raise SystemExit(f"bench_serve: the server process exited (code {proc.exitcode}) before serving; "
                             "its error is above")
    raise SystemExit(f"bench_serve: no server ready after {limit_s} s")


def report(mode, clients, r):
    print(f"{mode:>6} {clients:>3} clients: {r['tok_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50'] * 1000:7.1f} ms  "
          f"p95 {r['ttft_p95'] * 1000:7.1f} ms  inter-token p50 {r['itl_p50'] * 1000:6.1f} ms  "
          f"p95 {r['itl_p95'] * 1000:6.1f} ms", flush=True)


def main():
    import multiprocessing
    from nanochat.common import init_script
    args = parser.parse_args()
    init_script()
    modes = ["batch"] if args.soak else args.modes.split(",")
    counts = [int(c) for c in args.clients.split(",")]
    # the servers run as `python -m scripts.chat_web` does (which sets this before torch loads OpenMP); the
    # spawned processes inherit it
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx = multiprocessing.get_context("spawn")
    urls, done = ctx.Queue(), ctx.Event()
    # not daemonic: a server starts its engine's process (stopped below, with the server)
    procs = [ctx.Process(target=server_process, args=(args, mode, urls, done)) for mode in modes]
    servers, runs, long_runs, long_text, pool = {}, {}, [], None, None
    try:
        for p in procs:  # one at a time: loading and tokenizer training do not overlap
            p.start()
            mode, url, text = wait_for_server(p, urls)
            servers[mode], long_text = url, long_text or text
        if args.soak:
            raise SystemExit(0 if soak(args, servers["batch"], procs[0].pid) else 1)
        pool = ClientPool(ctx, max(counts + [8 if long_text else 1]))
        for url in servers.values():  # warm-up: every client's first request pays for lazy imports and a connection
            pool.run(url, [[conversation(c, 0)] for c in range(len(pool.jobs))], 8)
        for _ in range(args.repeats):
            for clients in counts:
                for mode in modes:
                    r = run_load(pool, servers[mode], clients, args.requests, args.max_tokens)
                    runs.setdefault((mode, clients), []).append(r)
                    report(mode, clients, r)
            if long_text and "batch" in servers:
                long_runs.append(run_long_prompt(pool, servers["batch"], long_text, args.long_reply))
                r = long_runs[-1]
                print(f"long prompt: worst gap of the 7 decoding rows {r['worst_gap'] * 1000:.1f} ms (their p50 "
                      f"otherwise {r['gap_p50_outside'] * 1000:.1f} ms, {r['decoding']} of 7 decoding throughout), "
                      f"its TTFT {r['ttft'] * 1000:.0f} ms", flush=True)
    finally:
        done.set()
        if pool is not None:
            pool.close()
        for p in procs:
            if p.pid is not None:  # started
                p.join(30)
                if p.is_alive():
                    p.kill()
    rows = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    if args.repeats > 1:
        print(f"medians of {args.repeats} runs:")
        for (mode, clients), r in rows.items():
            report(mode, clients, r)
    if ("batch", 1) in rows and ("batch", 8) in rows:
        one, eight = rows["batch", 1]["ttft_p50"], rows["batch", 8]
        print(f"batch mode, 8 clients: TTFT p50 / single-client p50 = {eight['ttft_p50'] / one:.2f}x (target <= 2x), "
              f"p95 / single-client p50 = {eight['ttft_p95'] / one:.2f}x (target <= 3x)")
    if ("batch", 8) in rows and ("worker", 8) in rows:
        print(f"8 clients: batch / worker aggregate tok/s = "
              f"{rows['batch', 8]['tok_per_s'] / rows['worker', 8]['tok_per_s']:.2f}x (target >= 4x)")
    if long_runs:
        worst = statistics.median(r["worst_gap"] for r in long_runs)
        print(f"long prompt ({args.long_prompt} tokens, {len(long_runs)} runs): median worst gap of the 7 "
              f"{worst * 1000:.1f} ms, median TTFT {statistics.median(r['ttft'] for r in long_runs) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
