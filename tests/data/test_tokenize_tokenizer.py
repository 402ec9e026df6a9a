"""neoxt.tokenizer: GPT-NeoX tokenizer types behind one interface, same ids as upstream's classes."""

from __future__ import annotations

import json
import sys

import pytest

from neoxt.config.schema import TokenizerConfig
from neoxt.errors import ConfigError
from neoxt.tokenizer import load_tokenizer, padded_vocab_size

TEXTS = ["Hello world! How are you today?", "  spaces\tand\nnewlines  ", "Ünïcödé 🦊", "",
         "end<|endoftext|>start"]
CHAT = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hello world!"},
    {"role": "assistant", "content": "Hi, how are you?"},
]


def test_padded_vocab_size_follows_gpt_neox():
    assert padded_vocab_size(50277) == 50304
    assert padded_vocab_size(50277, 128, 2) == 50432
    assert padded_vocab_size(320) == 384
    assert padded_vocab_size(384) == 384
    assert padded_vocab_size(50257, 64, 1) == 50304
    with pytest.raises(ConfigError):
        padded_vocab_size(10, 0)


@pytest.mark.parametrize("form", ["file", "dir"])
def test_hf_tokenizer_matches_upstream_encoding(tiny_tokenizer_dir, form):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    path = tiny_tokenizer_dir / "tokenizer.json" if form == "file" else tiny_tokenizer_dir
    tok = load_tokenizer(TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(path)))
    assert tok.vocab_size == 320
    assert tok.eod_id == raw.token_to_id("<|endoftext|>") == 0
    assert tok.pad_id == raw.token_to_id("<|padding|>") == 1
    assert tok.eos_id == 0
    for text in TEXTS:
        assert tok.encode(text) == raw.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [raw.encode(t).ids for t in TEXTS]
    assert tok.chat_template is not None  # read from chat_template.jinja beside tokenizer.json


def test_chat_template_matches_transformers(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok = load_tokenizer(TokenizerConfig(vocab_file=str(tiny_tokenizer_dir)))
    for gen in (False, True):
        assert tok.render_chat(CHAT[:2], add_generation_prompt=gen) == hf.apply_chat_template(
            CHAT[:2], add_generation_prompt=gen, tokenize=False)
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == hf.apply_chat_template(
            CHAT, add_generation_prompt=gen, tokenize=True, return_dict=False)
    # a template given in the config (text or file) wins over the directory's
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    custom = load_tokenizer(TokenizerConfig(vocab_file=str(tiny_tokenizer_dir), chat_template=str(tmp_path / "t.jinja")))
    assert custom.render_chat(CHAT[:1]) == "[system] Be nice.\n"
    bare = tmp_path / "bare.json"
    bare.write_text((tiny_tokenizer_dir / "tokenizer.json").read_text())
    with pytest.raises(ConfigError, match="has no chat template"):
        load_tokenizer(TokenizerConfig(vocab_file=str(bare))).render_chat(CHAT)


def _write_vocab_merges(tiny_tokenizer_dir, tmp_path):
    model = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_gpt2_bpe_matches_transformers_gpt2_tokenizer(tiny_tokenizer_dir, tmp_path):
    from transformers import GPT2Tokenizer

    vocab, merges = _write_vocab_merges(tiny_tokenizer_dir, tmp_path)
    upstream = GPT2Tokenizer(vocab, merges, errors="replace")  # what upstream's _GPT2BPETokenizer builds
    tok = load_tokenizer(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.eod_id == upstream.convert_tokens_to_ids("<|endoftext|>")
    for text in TEXTS:
        assert tok.encode(text) == upstream.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(json.loads((tmp_path / "vocab.json").read_text()))  # len(encoder) upstream


def test_char_level():
    tok = load_tokenizer(tokenizer_type="CharLevelTokenizer")
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 105]) == "hi"
    assert tok.vocab_size == 512 and tok.eod_id == 0 and tok.pad_id == 1


@pytest.mark.parametrize(("ttype", "module"), [("SPMTokenizer", "sentencepiece"), ("TiktokenTokenizer", "tiktoken")])
def test_optional_backends_say_what_to_install(monkeypatch, tmp_path, ttype, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    (tmp_path / "m.model").write_bytes(b"x")
    with pytest.raises(ConfigError, match=f"pip install {module}"):
        load_tokenizer(tokenizer_type=ttype, vocab_file=str(tmp_path / "m.model"))


def test_config_errors(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ConfigError, match="tokenizer_type 'Nope' is not supported"):
        load_tokenizer(tokenizer_type="Nope", vocab_file="x")
    with pytest.raises(ConfigError, match="needs vocab_file"):
        load_tokenizer(tokenizer_type="HFTokenizer")
    with pytest.raises(ConfigError, match=r"missing\.json: file not found"):
        load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"junk\.json: not a tokenizers JSON file"):
        load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "junk.json"))
    vocab, _ = _write_vocab_merges(tiny_tokenizer_dir, tmp_path)
    with pytest.raises(ConfigError, match="needs merge_file"):
        load_tokenizer(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab)
    # type names are case-insensitive, as upstream compares them lowercased
    assert load_tokenizer(tokenizer_type="hftokenizer", vocab_file=str(tiny_tokenizer_dir)).vocab_size == 320


def test_hf_gpt2_tokenizer_adds_padding(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"] * 10, trainer=trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path / "gpt2ish")
    base = load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "gpt2ish"))
    assert base.pad_id is None
    hf_gpt2 = load_tokenizer(tokenizer_type="HFGPT2Tokenizer", vocab_file=str(tmp_path / "gpt2ish"))
    assert hf_gpt2.vocab_size == base.vocab_size + 1  # upstream: len(tokenizer) after adding <|padding|>
    assert hf_gpt2.pad_id == base.vocab_size and hf_gpt2.eod_id == 0
    assert hf_gpt2.encode("hello world<|padding|>")[-1] == hf_gpt2.pad_id


def test_directory_without_tokenizer_json_goes_through_transformers(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"vocab_file .*d: not a file, directory or loadable Hub tokenizer"):
        load_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "d"))
