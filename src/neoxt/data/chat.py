"""``neoxt preprocess-chat``: conversations -> tokens + labels through the tokenizer's chat template.

Upstream (tools/datasets/preprocess_data_with_chat_template.py) builds each conversation turn by
turn: turn ``i``'s tokens are the tokens of ``template(chat[:i+1])`` past the tokens already
emitted, with the generation prompt added when the *next* turn is the generation role's. The
prompt that opens an assistant turn therefore belongs to the turn before it and is masked with it.
We reproduce that construction exactly (same tokens, same labels, same int32 files), including:

- default: labels are ``-100`` on every turn not spoken by the generation role, the token id elsewhere;
- ``only_last``: only the final turn can be trained (and only if it is the generation role's);
- after the conversation the tokenizer's EOS is appended; its label is EOS when the label before it
  is trained, else ``-100``;
- ``for_rm``: the whole conversation rendered at once, all labels ``-100``, then ``EOS, EOS`` with
  labels ``-100, EOS`` (the reward is read at the last position).

Where upstream fails we decide:

- ``no_mask`` crashes upstream. Here it writes the same tokens as the default mode (EOS included) and
  a label file whose labels equal the tokens — loss on everything, and the same pair of files in every
  mode so a config needs no change when the mode does.
- transformers 5's ``apply_chat_template`` returns a BatchEncoding; we render to text and encode it
  without added special tokens, which is what transformers 4.38 (upstream's pin) did.
- Rewards are stored as int32 like upstream; a fractional reward would be truncated there, so it is
  an error here (use ``binary_reward`` or scale them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neoxt.config.schema import TokenizerConfig
from neoxt.data.readers import Batch, decode_payload, expand_inputs, iter_batches
from neoxt.data.tokenize import EncodedBatch, PipelineStats, check_outputs, open_writers, pack, run_pipeline
from neoxt.errors import DataError

IGNORE = -100


def build_chat(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    generation_role: str = "assistant",
    mask: bool = True,
    only_last: bool = False,
    for_rm: bool = False,
) -> tuple[list[int], list[int]]:
    """Tokens and labels of one conversation (see the module docstring for the rules)."""
    eos = tokenizer.eos_id
    if for_rm:
        if eos is None:
            raise DataError(f"tokenizer {tokenizer.name} has no EOS token; --for-rm needs one")
        tokens = tokenizer.apply_chat_template(messages)
        return tokens + [eos, eos], [IGNORE] * len(tokens) + [IGNORE, eos]
    tokens: list[int] = []
    labels: list[int] = []
    last = len(messages) - 1
    for i, turn in enumerate(messages):
        add_gen = i != last and messages[i + 1]["role"] == generation_role
        piece = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=add_gen)[len(tokens):]
        tokens.extend(piece)
        if not mask:
            labels.extend(piece)
        elif (only_last and i != last) or turn["role"] != generation_role:
            labels.extend([IGNORE] * len(piece))
        else:
            labels.extend(piece)
    if eos is not None:
        labels.append(eos if labels and labels[-1] != IGNORE else IGNORE)
        tokens.append(eos)
    return tokens, labels


@dataclass(frozen=True)
class ChatEncodeSpec:
    tokenizer_path: str
    keys: tuple[str, ...] = ("conversation",)
    generation_role: str = "assistant"
    only_last: bool = False
    no_mask: bool = False
    for_rm: bool = False
    reward_key: str | None = None
    binary_reward: bool = False
    chat_template: str | None = None

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=self.tokenizer_path,
                               chat_template=self.chat_template)


def output_names(key: str, with_reward: bool) -> dict[str, str]:
    """Pipeline output name -> file key, upstream's naming (``<key>``, ``<key>_label``, ``<key>_reward``)."""
    names = {key: key, f"{key}_label": f"{key}_label"}
    if with_reward:
        names[f"{key}_reward"] = f"{key}_reward"
    return names


def _messages(rec: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    if key not in rec:
        raise DataError(f"{where}: missing key {key!r} (keys: {', '.join(map(str, rec)) or 'none'})")
    chat = rec[key]
    if not isinstance(chat, list):
        raise DataError(f"{where}: key {key!r} holds {type(chat).__name__}, expected a list of messages")
    for j, m in enumerate(chat):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {j} of {key!r} needs 'role' and 'content', got {m!r:.80}")
    return chat


def _reward(rec: dict[str, Any], key: str, binary: bool, where: str) -> list[int]:
    if key not in rec:
        raise DataError(f"{where}: missing reward key {key!r}")
    value = rec[key]
    if binary:
        return [1] if value else [-1]
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v != int(v):
            raise DataError(f"{where}: reward {v!r} is not an integer; reward files are int32 "
                            "(upstream's format) — use --binary-reward or scale the rewards")
        out.append(int(v))
    return out


class ChatEncoder:
    """Batch of conversations -> tokens, labels (and rewards) per key; one per worker process."""

    def __init__(self, spec: ChatEncodeSpec):
        from neoxt.tokenizer import load_tokenizer

        self.spec = spec
        self.tok = load_tokenizer(spec.tokenizer_config())
        if not self.tok.chat_template:
            raise DataError(f"{spec.tokenizer_path}: tokenizer has no chat template (pass --chat-template)")

    def __call__(self, batch: Batch) -> EncodedBatch:
        s = self.spec
        out = EncodedBatch(arrays={})
        results: dict[str, list[list[int]]] = {name: [] for k in s.keys for name in output_names(k, bool(s.reward_key))}
        for i in range(len(batch.payloads)):
            where = batch.location(i)
            try:
                rec = decode_payload(batch, i)
                if rec is None:
                    continue
                row: dict[str, list[int]] = {}
                for key in s.keys:
                    chat = _messages(rec, key, where)
                    if not chat:
                        raise DataError(f"{where}: conversation {key!r} is empty")
                    try:
                        tokens, labels = build_chat(chat, self.tok, s.generation_role, not s.no_mask,
                                                    s.only_last, s.for_rm)
                    except DataError as err:
                        raise DataError(f"{where}: {err}") from None
                    row[key], row[f"{key}_label"] = tokens, labels
                    if s.reward_key:
                        row[f"{key}_reward"] = _reward(rec, s.reward_key, s.binary_reward, where)
                    out.nbytes += sum(len(str(m.get("content", ""))) for m in chat)
            except DataError as err:
                out.bad.append(str(err))
                continue
            for name, ids in row.items():
                results[name].append(ids)
            out.docs += 1
        out.arrays = {name: pack(seqs) for name, seqs in results.items()}
        return out


@dataclass(frozen=True)
class ChatResult:
    outputs: dict[str, str]  # output name (key, key_label, key_reward) -> dataset prefix
    stats: PipelineStats


def preprocess_chat(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    keys: Sequence[str] = ("conversation",),
    generation_role: str = "assistant",
    only_last: bool = False,
    no_mask: bool = False,
    for_rm: bool = False,
    reward_key: str | None = None,
    binary_reward: bool = False,
    chat_template: str | None = None,
    workers: int = 1,
    skip_bad_lines: bool = False,
    num_docs: int | None = None,
    batch_size: int = 64,
    split: str | None = None,
    subset: str | None = None,
) -> ChatResult:
    """Write ``<prefix>_<key>_document`` and ``<prefix>_<key>_label_document`` (+ reward) per key."""
    keys = tuple(keys)
    if not keys or len(set(keys)) != len(keys):
        raise DataError(f"--jsonl-keys must be distinct and non-empty, got {list(keys)}")
    if no_mask and for_rm:
        raise DataError("--no-mask and --for-rm contradict each other (reward-model data is masked)")
    for key in keys:
        for suffix in ("_label", "_reward"):
            if key + suffix in keys:
                raise DataError(f"--jsonl-keys: {key + suffix!r} would collide with the generated "
                                f"{suffix[1:]} file of {key!r}")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    spec = ChatEncodeSpec(tokenizer_path=tokenizer_path, keys=keys, generation_role=generation_role,
                          only_last=only_last, no_mask=no_mask, for_rm=for_rm, reward_key=reward_key,
                          binary_reward=binary_reward, chat_template=chat_template)
    outputs = {name: f"{output_prefix}_{file_key}_document"
               for key in keys for name, file_key in output_names(key, bool(reward_key)).items()}
    check_outputs(outputs.values())  # an unwritable output fails before any work
    ChatEncoder(spec)  # fail here, in the main process, on a bad tokenizer or missing template
    paths = expand_inputs(inputs)
    columns = list(keys) + ([reward_key] if reward_key else [])
    batches = iter_batches(paths, columns, batch_size=batch_size, split=split, subset=subset)
    writers = open_writers(outputs, np.int32)  # upstream forces int32 for every file
    stats = run_pipeline(batches, ChatEncoder, spec, writers, workers=workers,
                         skip_bad_lines=skip_bad_lines, num_docs=num_docs, label="preprocess-chat")
    return ChatResult(outputs=outputs, stats=stats)
