"""`neoxt preprocess-chat`: labels are -100 exactly where the generation role did not speak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neoxt.cli import main
from neoxt.data.chat import IGNORE, preprocess_chat
from neoxt.data.indexed import IndexedDataset
from neoxt.errors import DataError

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be nice and precise."},
        {"role": "user", "content": "Hello world! How are you today?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": "What does a language model predict?"},
        {"role": "assistant", "content": "The next token from the tokens before it."},
    ],
    [
        {"role": "user", "content": "Numbers like 12345?"},
        {"role": "assistant", "content": "And 67890 appear in text as well."},
    ],
    [  # ends with a user turn: under --only-last nothing is trained
        {"role": "system", "content": "The assistant answers politely."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
]


def write_chats(path: Path, key: str = "messages", extra=None) -> Path:
    with open(path, "w") as f:
        for i, conv in enumerate(CONVERSATIONS):
            row = {key: conv, **((extra or {}).get(i, {}))}
            f.write(json.dumps(row) + "\n")
    return path


def trained_spans(rendered: str, conv: list[dict], which: str) -> list[tuple[int, int]]:
    """Character spans of `rendered` that the given mode trains: an assistant turn is its content and
    the `<|end|>\\n` that closes it (its `<|assistant|>\\n` opener is the previous turn's generation prompt)."""
    spans, cursor = [], 0
    for i, msg in enumerate(conv):
        start = rendered.index(msg["content"], cursor)
        end = rendered.index("<|end|>\n", start) + len("<|end|>\n")
        cursor = end
        trained = msg["role"] == "assistant"
        if which == "only_last":
            trained = trained and i == len(conv) - 1
        if trained:
            spans.append((start, end))
    return spans


def expected(conv, tokenizer_dir: Path, mode: str) -> tuple[list[int], list[int]]:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rendered = hf.apply_chat_template(conv, tokenize=False)
    enc = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(rendered, add_special_tokens=False)
    ids, eos = enc.ids, hf.eos_token_id
    if mode == "for_rm":
        return ids + [eos, eos], [IGNORE] * len(ids) + [IGNORE, eos]
    if mode == "no_mask":
        return ids + [eos], ids + [eos]
    spans = trained_spans(rendered, conv, mode)
    labels = [t if any(s <= a and b <= e for s, e in spans) else IGNORE for t, (a, b) in zip(ids, enc.offsets)]
    # every token is wholly inside or wholly outside a span
    for a, b in enc.offsets:
        assert all(b <= s or a >= e or (s <= a and b <= e) for s, e in spans)
    labels.append(eos if labels[-1] != IGNORE else IGNORE)
    return ids + [eos], labels


@pytest.mark.parametrize("mode", ["default", "only_last", "no_mask", "for_rm"])
def test_labels_match_offsets_from_rendered_template(tmp_path, tiny_tokenizer_dir, mode):
    src = write_chats(tmp_path / "chats.jsonl")
    res = preprocess_chat(str(src), str(tmp_path / "sft"), str(tiny_tokenizer_dir), keys=["messages"],
                          only_last=mode == "only_last", no_mask=mode == "no_mask", for_rm=mode == "for_rm")
    assert res.outputs == {"messages": str(tmp_path / "sft_messages_document"),
                           "messages_label": str(tmp_path / "sft_messages_label_document")}
    tokens = IndexedDataset(res.outputs["messages"])
    labels = IndexedDataset(res.outputs["messages_label"])
    assert tokens.dtype == labels.dtype == np.int32  # upstream forces int32 for both
    assert len(tokens) == len(labels) == len(CONVERSATIONS)
    for i, conv in enumerate(CONVERSATIONS):
        exp_tokens, exp_labels = expected(conv, tiny_tokenizer_dir, mode)
        assert tokens[i].tolist() == exp_tokens, i
        assert labels[i].tolist() == exp_labels, i
    if mode == "only_last":
        assert set(labels[2].tolist()) == {IGNORE}  # ends with a user turn
    if mode == "default":
        assert (labels[0] != IGNORE).sum() > 0 and (labels[0] == IGNORE).sum() > 0


def upstream_build_chat(chat, tok, generation_role="assistant"):
    """Upstream's published procedure (prefix differences of apply_chat_template), default mode."""
    tokens, mask = [], []
    for i, turn in enumerate(chat):
        add_gen = False if i == len(chat) - 1 else chat[i + 1]["role"] == generation_role
        ids = tok.apply_chat_template(chat[: i + 1], add_generation_prompt=add_gen, tokenize=True,
                                      return_dict=False)
        piece = ids[len(tokens):]
        tokens.extend(piece)
        mask.extend([-100] * len(piece) if turn["role"] != generation_role else piece)
    mask.append(tok.eos_token_id if mask[-1] != -100 else -100)
    tokens.append(tok.eos_token_id)
    return tokens, mask


@pytest.mark.parametrize("workers", [1, 2])
def test_files_byte_identical_to_upstream_procedure(tmp_path, tiny_tokenizer_dir, workers):
    import struct

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    src = write_chats(tmp_path / "c.jsonl", key="conversation")  # upstream's default key
    res = preprocess_chat(str(src), str(tmp_path / "o"), str(tiny_tokenizer_dir), workers=workers, batch_size=1)
    built = [upstream_build_chat(c, hf) for c in CONVERSATIONS]
    for name, part in (("conversation", 0), ("conversation_label", 1)):
        seqs = [b[part] for b in built]
        data = b"".join(struct.pack(f"<{len(s)}i", *s) for s in seqs)
        assert Path(res.outputs[name] + ".bin").read_bytes() == data
        sizes = [len(s) for s in seqs]
        pointers = [4 * sum(sizes[:k]) for k in range(len(sizes))]
        idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, len(seqs), len(seqs) + 1)
               + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
               + struct.pack(f"<{len(seqs) + 1}q", *range(len(seqs) + 1)))
        assert Path(res.outputs[name] + ".idx").read_bytes() == idx


def test_rewards(tmp_path, tiny_tokenizer_dir):
    src = write_chats(tmp_path / "r.jsonl", extra={0: {"score": 1}, 1: {"score": 0}, 2: {"score": 3}})
    res = preprocess_chat(str(src), str(tmp_path / "r"), str(tiny_tokenizer_dir), keys=["messages"],
                          reward_key="score", binary_reward=True)
    rewards = IndexedDataset(res.outputs["messages_reward"])
    assert [r.tolist() for r in rewards] == [[1], [-1], [1]]
    res = preprocess_chat(str(src), str(tmp_path / "s"), str(tiny_tokenizer_dir), keys=["messages"],
                          reward_key="score")
    assert [r.tolist() for r in IndexedDataset(res.outputs["messages_reward"])] == [[1], [0], [3]]
    frac = write_chats(tmp_path / "f.jsonl", extra={0: {"score": 0.5}, 1: {"score": 1}, 2: {"score": 1}})
    with pytest.raises(DataError, match=r"f\.jsonl:1: reward 0\.5 is not an integer"):
        preprocess_chat(str(frac), str(tmp_path / "f"), str(tiny_tokenizer_dir), keys=["messages"],
                        reward_key="score")
    assert not list(tmp_path.glob("f_*"))


def test_bad_conversations(tmp_path, tiny_tokenizer_dir):
    tok = str(tiny_tokenizer_dir)
    cases = {
        "missing.jsonl": ('{"messages": []}\n{"other": 1}\n', r"missing\.jsonl:1: conversation 'messages' is empty"),
        "nokey.jsonl": ('{"other": 1}\n', r"nokey\.jsonl:1: missing key 'messages'"),
        "badmsg.jsonl": ('{"messages": [{"role": "user"}]}\n', r"badmsg\.jsonl:1: message 0 of 'messages' needs"),
        "notlist.jsonl": ('{"messages": "hi"}\n', r"notlist\.jsonl:1: key 'messages' holds str"),
        "json.jsonl": ('{"messages": [\n', r"json\.jsonl:1: malformed JSON"),
    }
    for name, (content, pattern) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=pattern):
            preprocess_chat(str(tmp_path / name), str(tmp_path / "o"), tok, keys=["messages"])
    assert not list(tmp_path.glob("o_*"))
    with pytest.raises(DataError, match="contradict"):
        preprocess_chat(str(tmp_path / "json.jsonl"), str(tmp_path / "o"), tok, no_mask=True, for_rm=True)

    # a tokenizer without a chat template is refused up front
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")).save(str(tmp_path / "bare.json"))
    with pytest.raises(DataError, match="has no chat template"):
        preprocess_chat(str(tmp_path / "json.jsonl"), str(tmp_path / "o"), str(tmp_path / "bare.json"))


def test_cli_skip_bad_lines(tmp_path, tiny_tokenizer_dir, capsys):
    src = write_chats(tmp_path / "c.jsonl")
    with open(src, "a") as f:
        f.write("garbage\n")
    args = ["preprocess-chat", "--input", str(src), "--output-prefix", str(tmp_path / "cli"),
            "--tokenizer-path", str(tiny_tokenizer_dir), "--jsonl-keys", "messages"]
    assert main(args) == 2
    assert "c.jsonl:4: malformed JSON" in capsys.readouterr().err
    assert main(args + ["--skip-bad-lines"]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and "skipped 1 bad records" in out and "c.jsonl:4" in out
    assert f'"train_label_data_paths": ["{tmp_path / "cli_messages_label_document"}"],' in out.splitlines()
    assert len(IndexedDataset(tmp_path / "cli_messages_label_document")) == 3


def test_inspect_shows_trained_spans(tmp_path, tiny_tokenizer_dir, capsys):
    src = write_chats(tmp_path / "c.jsonl")
    preprocess_chat(str(src), str(tmp_path / "i"), str(tiny_tokenizer_dir), keys=["messages"])
    assert main(["data", "inspect", str(tmp_path / "i_messages_document"), "--doc", "1",
                 "--tokenizer", str(tiny_tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "label file" in out and "dtype      int32 (code 4)" in out
    spans = out.split("trained spans (label != -100):\n")[1].splitlines()
    assert spans == ["  'And 67890 appear in text as well.<|end|>\\n<|endoftext|>'"]
    assert main(["data", "inspect", str(tmp_path / "i_messages_label_document"), "--doc", "0"]) == 0
    assert "masked (-100)" in capsys.readouterr().out


def test_template_errors_name_the_record(tmp_path, tiny_tokenizer_dir):
    strict = "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 % 2 == 1 %}{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n"
                   + json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                              {"role": "user", "content": "b"}]}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: chat template of HFTokenizer failed on these messages: "
                                        r".*roles must alternate"):
        preprocess_chat(str(src), str(tmp_path / "o"), str(tiny_tokenizer_dir), keys=["messages"],
                        chat_template=strict)
    assert not list(tmp_path.glob("o_*"))


def test_failure_writing_one_index_commits_no_file(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Tokens and labels are one unit: if the label index cannot be written, the token files never appear."""
    from neoxt.data.indexed import IndexedDatasetWriter

    real = IndexedDatasetWriter.write_index

    def failing(self):
        if "label" in self.prefix:
            raise OSError("disk full")
        return real(self)

    monkeypatch.setattr(IndexedDatasetWriter, "write_index", failing)
    src = write_chats(tmp_path / "c.jsonl")
    with pytest.raises(OSError, match="disk full"):
        preprocess_chat(str(src), str(tmp_path / "o"), str(tiny_tokenizer_dir), keys=["messages"])
    assert not list(tmp_path.glob("o_*"))
