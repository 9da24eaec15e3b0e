"""
Benchmark the chat server under concurrent users: 1, 8 and 32 clients stream replies through the official
`openai` client from live servers (uvicorn on 127.0.0.1, one child process per serve mode). Each load runs
against the continuous-batching server (`--serve-mode batch`) and the one-request-per-replica server
(`worker`), one after the other at each client count, so both see the same machine conditions. Reported per
mode and client count: aggregate generated tok/s (the server's own token count over the wall time), p50/p95
time to first token (request sent -> first content chunk) and p50 inter-token latency (per request: time
between its first and last chunk over the chunks in between).

With --soak=SECONDS it runs a soak test instead, against one batch-mode server: --soak-clients threads send
a mix of streaming and non-streaming requests (random lengths and sampling settings), hang up on a random
share of them mid-reply, and slip in a few hostile bodies that must be refused. It reports requests served,
client disconnects, errors by kind, rows leaked once the load stops (/stats must return to 0 active rows and
an empty queue) and the server's RSS at start, after warm-up (the first fifth) and at the end. It passes (exit
status 0) with no errors, no leaked rows and RSS grown by at most 10% after warm-up.

Launch:
    python -m scripts.bench_serve                          # random d4 model (the CPU recipe's shapes, vocab 8192)
    python -m scripts.bench_serve --source sft             # a trained checkpoint from $NANOCHAT_BASE_DIR
    python -m scripts.bench_serve --clients 1,8 --max-tokens 32 --requests 1
    python -m scripts.bench_serve --soak=300               # a 5-minute soak with 16 clients

A random model needs a tokenizer of its vocabulary: the trained one in $NANOCHAT_BASE_DIR/tokenizer if its
size matches, else one trained here in seconds on the pretraining shards (NANOCHAT_DATA_DIR or downloaded).
"""

import os
import sys
import json
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
parser.add_argument("--clients", type=str, default="1,8,32", help="comma-separated concurrent client counts")
parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (greedy; a reply may stop early)")
parser.add_argument("--max-rows", type=int, default=8, help="batch mode: requests decoded together (the server default)")
parser.add_argument("--modes", type=str, default="batch,worker", help="comma-separated serve modes to compare")
parser.add_argument("--device-type", type=str, default="cpu", help="cuda|cpu|mps")
parser.add_argument("--repeats", type=int, default=1, help="runs of each load, interleaved; medians are reported")
parser.add_argument("--soak", type=float, default=0, help="run a soak test of this many seconds instead (see above)")
parser.add_argument("--soak-clients", type=int, default=16, help="soak: concurrent client threads")
parser.add_argument("--soak-disconnect", type=float, default=0.2, help="soak: share of requests hung up mid-reply")
MAX_RSS_GROWTH = 0.10  # soak: the server's RSS may grow at most this much after warm-up

WORDS = ["rivers", "the moon", "bread", "chess", "volcanoes", "music", "bees", "glass", "trains", "salt"]


def random_model(depth, vocab_size, device, dtype):
    """A freshly initialised GPT of the CPU recipe's shapes (head dim 64, 512-token context, full windows)."""
    import torch
    from nanochat.gpt import GPT, config_from_depth
    config = config_from_depth(depth, head_dim=64, max_seq_len=512, vocab_size=vocab_size, window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(dtype)
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


def run_load(url, clients, requests, max_tokens):
    """`clients` threads, each streaming `requests` replies in turn: per-request (ttft, [chunk times])."""
    import httpx
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    results, errors = [], []

    def user(c):
        for r in range(requests):
            messages = [{"role": "user", "content": f"Tell me about {WORDS[(c + r) % len(WORDS)]} ({c}, {r})."}]
            try:
                t0 = time.perf_counter()
                stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                        temperature=0.0, stream=True)
                times = [time.perf_counter() - t0 for chunk in stream if chunk.choices[0].delta.content]
                results.append(times)
            except Exception as e:  # reported after the run
                errors.append(repr(e))

    before = httpx.get(url + "/stats").json()["total_tokens"]
    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = httpx.get(url + "/stats").json()["total_tokens"] - before
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ttft = [times[0] for times in results if times]
    itl = [(times[-1] - times[0]) / (len(times) - 1) for times in results if len(times) > 1]
    return {"tok_per_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95), "itl_p50": percentile(itl, 0.5)}


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
    rss = lambda: server.memory_info().rss / 2**20  # noqa: E731  MiB
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
    if args.source:
        from nanochat.model_loader import load_model
        model, tok, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, dtype=dtype)
    else:
        model, tok = random_model(args.depth, args.vocab_size, device, dtype), tokenizer_of_size(args.vocab_size)
    cfg = model.config
    print(f"{mode} server: depth {cfg.n_layer}, width {cfg.n_embd}, vocab {cfg.vocab_size}, context "
          f"{cfg.sequence_len}, {'checkpoint ' + args.source if args.source else 'random weights'}, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    if args.soak:  # thousands of exchanges: keep the server's per-request log out of the report
        sys.stdout = open(os.devnull, "w")
    replica = make_replica(0, device, model, tok, max_rows=1 if mode == "worker" else args.max_rows, max_queue=4096)
    url, stop = serve_in_thread(create_app([replica], ServeConfig(model_name="bench", serve_mode=mode)))
    urls.put((mode, url))
    done.wait()
    stop()


def main():
    import multiprocessing
    from nanochat.files import install_error_handler
    args = parser.parse_args()
    install_error_handler()
    modes = ["batch"] if args.soak else args.modes.split(",")
    ctx = multiprocessing.get_context("spawn")
    urls, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=server_process, args=(args, mode, urls, done), daemon=True) for mode in modes]
    servers, runs = {}, {}
    try:
        for p in procs:  # one at a time: loading and tokenizer training do not overlap
            p.start()
            mode, url = urls.get(timeout=600)
            run_load(url, 1, 1, 8)  # warm-up
            servers[mode] = url
        if args.soak:
            raise SystemExit(0 if soak(args, servers["batch"], procs[0].pid) else 1)
        for _ in range(args.repeats):
            for clients in [int(c) for c in args.clients.split(",")]:
                for mode in modes:
                    r = run_load(servers[mode], clients, args.requests, args.max_tokens)
                    runs.setdefault((mode, clients), []).append(r)
                    print(f"{mode:>6} {clients:>3} clients: {r['tok_per_s']:8.1f} tok/s ({r['tokens']} tokens in "
                          f"{r['wall_s']:.1f} s)  TTFT p50 {r['ttft_p50'] * 1000:7.1f} ms  p95 "
                          f"{r['ttft_p95'] * 1000:7.1f} ms  inter-token p50 {r['itl_p50'] * 1000:6.1f} ms", flush=True)
        rows = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
        if args.repeats > 1:
            print(f"medians of {args.repeats} runs:")
            for (mode, clients), r in rows.items():
                print(f"{mode:>6} {clients:>3} clients: {r['tok_per_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50'] * 1000:7.1f} "
                      f"ms  p95 {r['ttft_p95'] * 1000:7.1f} ms  inter-token p50 {r['itl_p50'] * 1000:6.1f} ms")
    finally:
        done.set()
        for p in procs:
            p.join(30)
    if ("batch", 8) in rows and ("worker", 8) in rows:
        print(f"8 clients: batch / worker aggregate tok/s = "
              f"{rows['batch', 8]['tok_per_s'] / rows['worker', 8]['tok_per_s']:.2f}x (target >= 3x)")
    if ("batch", 1) in rows and ("batch", 8) in rows:
        print(f"batch mode: p95 TTFT at 8 clients / 1 client = "
              f"{rows['batch', 8]['ttft_p95'] / rows['batch', 1]['ttft_p95']:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
