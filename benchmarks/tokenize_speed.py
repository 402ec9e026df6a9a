"""Tokens/s of ``neoxt preprocess`` (1 and 2 workers) beside the tokenizer's own ``encode_batch``.

    .venv/bin/python benchmarks/tokenize_speed.py [--mb 20] [--vocab 16384 | --tokenizer tokenizer.json]
                                            [--workers 1 2] [--repeat 3]

Builds a synthetic English-like corpus (Zipf-distributed words, sentences, paragraphs) as JSONL in a
temporary directory, trains a byte-level BPE tokenizer on part of it (in-process, no network), then
times on the same text:

* ``encode_batch 1 thread``  — ``tokenizers.Tokenizer.encode_batch_fast`` with parallelism off: the
  per-core ceiling for any pipeline built on this tokenizer;
* ``encode_batch all cores`` — the same with the Rust thread pool on every core: the machine's ceiling;
* ``upstream-style N workers`` — GPT-NeoX preprocess_data.py's shape re-created (multiprocessing
  ``Pool.imap`` over documents, chunksize 25, one ``encode`` per document, one ``add_item`` each);
* ``neoxt preprocess N workers`` — the real command (``python -m neoxt.cli preprocess``), wall time
  of the whole process: start-up, JSON parsing, tokenizing, writing, renaming.

Beside wall time each row reports the CPU seconds its process tree used (workers included), which
on a shared, loaded machine is the steadier measure of how much work each approach does.

Every row runs in its own subprocess. Prints one table; asserts nothing. Timings on a shared machine
are noisy: run twice and compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

WORDS = (
    "the of and to a in is that for it as was with be by on not he I this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "model language token data training learning network layer attention transformer gradient loss "
    "checkpoint parallel memory compute batch sequence position rotary embedding vocabulary optimizer "
    "schedule warmup decay precision throughput latency benchmark dataset corpus document sentence word "
    "river mountain city village market forest ocean winter summer morning evening yesterday tomorrow "
    "quickly slowly carefully happily suddenly finally probably certainly nearly almost already always"
).split()


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    rng = np.random.RandomState(seed)
    ranks = np.arange(1, len(WORDS) + 1)
    p = 1.0 / ranks
    p /= p.sum()
    target = int(megabytes * 2**20)
    written = docs = 0
    with open(path, "w") as f:
        while written < target:
            sentences = []
            for _ in range(rng.randint(3, 40)):
                words = [WORDS[i] for i in rng.choice(len(WORDS), size=rng.randint(4, 25), p=p)]
                words[0] = words[0].capitalize()
                if rng.rand() < 0.2:
                    words.insert(rng.randint(len(words)), str(rng.randint(0, 100000)))
                sentences.append(" ".join(words) + rng.choice([".", ".", ".", "!", "?", ","]))
            text = " ".join(sentences)
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs, written


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with open(corpus) as f:
        for i, line in enumerate(f):
            texts.append(json.loads(line)["text"])
            if i >= 2000:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))


ENCODE_SNIPPET = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(l)["text"] for l in open(sys.argv[2])]
t = time.perf_counter(); n = 0
for i in range(0, len(texts), 1024):
    n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 1024]))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t}))
"""

UPSTREAM_SNIPPET = """
import json, sys, time, multiprocessing
import numpy as np
sys.path.insert(0, sys.argv[4])
from neoxt.data.indexed import IndexedDatasetWriter
_tok = None
def init(path):
    global _tok
    from tokenizers import Tokenizer
    _tok = Tokenizer.from_file(path)
def encode(line):
    text = json.loads(line)["text"]
    ids = _tok.encode(text).ids
    ids.append(_tok.token_to_id("<|endoftext|>"))
    return ids
if __name__ == "__main__":
    t = time.perf_counter()
    workers = int(sys.argv[3])
    w = IndexedDatasetWriter(sys.argv[5], np.uint16)
    n = 0
    with open(sys.argv[2]) as f:
        if workers > 1:
            pool = multiprocessing.Pool(workers, initializer=init, initargs=(sys.argv[1],))
            it = pool.imap(encode, f, chunksize=25)
        else:
            init(sys.argv[1]); it = map(encode, f)
        for ids in it:
            w.add_item(np.array(ids, dtype=np.uint16)); w.end_document(); n += len(ids)
    w.finalize()
    print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t}))
"""


def children_cpu() -> float:
    """CPU seconds of every finished descendant (their pool workers included): load-independent cost."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of JSONL")
    ap.add_argument("--vocab", type=int, default=16384, help="size of the BPE trained when no --tokenizer")
    ap.add_argument("--tokenizer", default=None,
                    help="an existing tokenizer.json to use instead of training one (e.g. GPT-2's)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from neoxt.data.indexed import IndexedDataset

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        corpus, tokfile = tmp / "corpus.jsonl", tmp / "tokenizer.json"
        docs, nbytes = make_corpus(corpus, args.mb)
        if args.tokenizer:
            tokfile = Path(args.tokenizer).resolve()
        else:
            train_tokenizer(corpus, tokfile, args.vocab)

        def best(run) -> tuple[int, float, float]:
            results = []
            for _ in range(max(1, args.repeat)):
                cpu = children_cpu()
                ntok, seconds = run()
                results.append((ntok, seconds, children_cpu() - cpu))
            return min(results, key=lambda r: r[1])

        def snippet(code: str, extra: list[str], parallel: str):
            def run() -> tuple[int, float]:
                r = run_json([PY, "-c", code, str(tokfile), str(corpus), *extra],
                             dict(env, TOKENIZERS_PARALLELISM=parallel))
                return r["tokens"], r["seconds"]
            return run

        def neoxt(w: int):
            def run() -> tuple[int, float]:
                t = time.perf_counter()
                subprocess.run([PY, "-m", "neoxt.cli", "preprocess", "--input", str(corpus), "--output-prefix",
                                str(tmp / f"neoxt{w}"), "--tokenizer-type", "HFTokenizer", "--vocab-file",
                                str(tokfile), "--append-eod", "--workers", str(w)],
                               env=env, check=True, capture_output=True)
                seconds = time.perf_counter() - t
                return IndexedDataset(str(tmp / f"neoxt{w}_text_document")).num_tokens, seconds
            return run

        rows = []
        for label, parallel in (("encode_batch 1 thread", "false"), ("encode_batch all cores", "true")):
            rows.append((label, *best(snippet(ENCODE_SNIPPET, [], parallel)),
                         "in-memory texts, excludes reading/writing"))
        for w in args.workers:
            extra = [str(w), str(ROOT / "src"), str(tmp / f"up{w}")]
            rows.append((f"upstream-style {w} worker{'s' * (w > 1)}", *best(snippet(UPSTREAM_SNIPPET, extra, "false")),
                         "Pool.imap per document, in-script timing"))
        for w in args.workers:
            rows.append((f"neoxt preprocess {w} worker{'s' * (w > 1)}", *best(neoxt(w)),
                         "whole command incl. start-up"))

    vocab = f"tokenizer {args.tokenizer}" if args.tokenizer else f"trained BPE vocab {args.vocab}"
    print(f"corpus: {docs:,} documents, {nbytes / 2**20:.1f} MB JSONL; {vocab}; "
          f"{os.cpu_count()} CPU cores; best of {max(1, args.repeat)}")
    print(f"{'what':<30} {'tokens':>12} {'seconds':>9} {'tokens/s':>12} {'cpu s':>7} {'tok/cpu-s':>11}  note")
    for label, ntok, sec, cpu, note in rows:
        print(f"{label:<30} {ntok:>12,} {sec:>9.2f} {ntok / sec:>12,.0f} {cpu:>7.2f} {ntok / cpu:>11,.0f}  {note}")
    print("cpu s: CPU time of the whole process tree (start-up included), so it is less sensitive to "
          "other load than wall time")


if __name__ == "__main__":
    main()
