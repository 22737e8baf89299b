"""Language-model groundwork: the stdlib corpus and its splits, tokenizers, perplexity (checked
against Hugging Face's own loss), calibration windows, the toy language a tiny decoder must
learn, and the cached reference model."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from graphprune.errors import ConfigError, GraphPruneError, InputError
from graphprune.lm import (
    ByteTokenizer, Document, LMSpec, corpus_calibration, encode, encode_documents, make_corpus,
    mean_nll, perplexity, pretrained_lm, random_windows, stdlib_corpus, stdlib_documents,
    text_calibration, toy_decoder, toy_language, train_tokenizer, train_toy_decoder, unigram_perplexity,
)
from graphprune.lm.corpus import SPLITS, split_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_importing_graphprune_imports_no_hugging_face_library():
    code = ("import sys, graphprune, graphprune.lm; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_transformers_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(ConfigError) as e:
        toy_decoder(8)
    assert str(e.value) == "toy_decoder needs transformers: pip install 'graphprune[hf]'."


# ---- corpus ---------------------------------------------------------------------------------

def _fake_stdlib(root):
    files = {
        "json/__init__.py": '"""JSON encoder."""\nclass A:\n    """Class doc."""\n'
                            '    def f(self):\n        """Method doc."""\n',
        "zz.py": 'def g():\n    """Function g."""\n\nasync def h():\n    """Coroutine h."""\n',
        "bad.py": "def (:\n",
        "nodoc.py": "x = 1\n",
        "notes.txt": "Plain notes.\n",
        "test/test_x.py": '"""Test doc."""\n',
        "tkinter/__init__.py": '"""Tk doc."""\n',
        "email/tests/t.py": '"""Nested test doc."""\n',
        "_sysconfigdata__linux.py": '"""Build doc."""\n',
        "site-packages/pkg.py": '"""Third party."""\n',
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_stdlib_documents_reads_docstrings_in_source_order_and_excludes_what_varies(tmp_path):
    _fake_stdlib(tmp_path)
    docs = {d.name: d.text for d in stdlib_documents(str(tmp_path))}
    stdlib = {k: v for k, v in docs.items() if k.startswith("stdlib:")}
    assert stdlib == {
        "stdlib:json/__init__.py": "json\nJSON encoder.\n\njson.A\nClass doc.\n\njson.A.f\nMethod doc.",
        "stdlib:zz.py": "zz.g\nFunction g.\n\nzz.h\nCoroutine h.",
        "stdlib:notes.txt": "Plain notes.",
    }
    import pydoc_data.topics

    topics = {k for k, v in pydoc_data.topics.topics.items() if v.strip()}
    assert {k[len("pydoc:"):] for k in docs if k.startswith("pydoc:")} == topics
    assert list(docs) == sorted(docs)


def test_split_is_by_document_deterministic_and_stable_when_documents_are_added():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(400)]
    c = make_corpus(docs, (0.8, 0.1, 0.1))
    names = [{d.name for d in c.split(s)} for s in SPLITS]
    assert set.union(*names) == {d.name for d in docs} and sum(map(len, names)) == len(docs)
    assert 280 < len(names[0]) < 360 and 20 < len(names[2]) < 60
    c2 = make_corpus(docs[::-1] + [Document("new", "x")], (0.8, 0.1, 0.1))
    for s, before in zip(SPLITS, names):
        assert {d.name for d in c2.split(s)} - {"new"} == before
    assert c.fingerprint == make_corpus(docs[::-1], (0.8, 0.1, 0.1)).fingerprint != c2.fingerprint
    assert split_of("doc7", (0.8, 0.1, 0.1)) in SPLITS


def test_corpus_errors():
    with pytest.raises(ConfigError) as e:
        make_corpus([Document("a", "x")], (0.9, 0.2, 0.1))
    assert str(e.value) == ("The 'fractions' parameter of make_corpus must be three non-negative numbers "
                            "(train, validation, test) summing to 1. Got (0.9, 0.2, 0.1) instead.")
    with pytest.raises(ConfigError, match="split of 1 documents is empty"):
        make_corpus([Document("a", "x")])
    c = make_corpus([Document(f"d{i}", "x") for i in range(100)])
    with pytest.raises(ConfigError, match="The 'split' parameter of Corpus.split must be one of"):
        c.split("valid")


def test_stdlib_corpus_is_large_english_and_split_by_document():
    c = stdlib_corpus()
    st = c.stats()
    assert st["train"]["characters"] > 1_000_000 and st["test"]["characters"] > 50_000
    assert st["validation"]["characters"] > 20_000
    names = [{d.name for d in c.split(s)} for s in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert any(n.startswith("pydoc:") for n in names[0]) and any(n.startswith("stdlib:") for n in names[2])
    assert not any(n.startswith(("stdlib:test/", "stdlib:tkinter/", "stdlib:encodings/")) for s in names
                   for n in s)
    text = c.text("train")
    assert text.count(" the ") > 5_000  # English prose, not code
    stdlib_corpus.cache_clear()  # the second build reads the on-disk cache: same documents
    assert stdlib_corpus().fingerprint == c.fingerprint


# ---- tokenizers -----------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_and_its_json_encodes_the_same(tmp_path):
    t = ByteTokenizer()
    text = "naïve café — 東京<|endoftext|>end"
    ids = t.encode(text)
    assert t.decode(ids) == text and ids.count(256) == 1 and max(ids) == 256
    assert train_tokenizer([], str(tmp_path), kind="byte") == "byte"
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False).ids == ids
    assert hf.decode(ids, skip_special_tokens=False) == text
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert fast.eos_token_id == 256 and encode(fast, text) == ids


def test_bpe_is_deterministic_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    texts = [d.text for d in stdlib_corpus().train[:40]]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert train_tokenizer(texts, str(a), kind="bpe", vocab_size=600) == "bpe"
    train_tokenizer(texts, str(b), kind="bpe", vocab_size=600)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(str(a))
    assert len(tok) == 600 and tok.eos_token_id == 0
    text = "Return the number of items in a container."
    ids = encode(tok, text)
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # merges learnt from the text
    stream = encode_documents(tok, ["one", "two"])
    assert stream.dtype == torch.long
    assert stream.tolist() == encode(tok, "one") + [0] + encode(tok, "two") + [0]


def test_encode_accepts_a_callable_and_rejects_anything_else():
    assert encode(lambda s: [len(s)], "abc") == [3]
    assert encode(lambda s: torch.tensor([[1, 2]]), "abc") == [1, 2]
    with pytest.raises(ConfigError, match="must be a transformers or tokenizers tokenizer.*Got int"):
        encode(3, "abc")
    with pytest.raises(ConfigError, match="returned str for a text"):
        encode(lambda s: s, "abc")


# ---- perplexity -----------------------------------------------------------------------------

def test_perplexity_of_uniform_and_of_an_oracle_model():
    ids = torch.arange(1003) % 11  # 1003 tokens: 7 windows of 128, the tail is dropped
    uniform = lambda x: torch.zeros(*x.shape, 11)  # noqa: E731
    assert perplexity(uniform, ids, seq_len=128, batch_size=3) == pytest.approx(11, rel=1e-6)

    def oracle(x):  # knows the next token of this stream: (t + 1) % 11
        return torch.nn.functional.one_hot((x + 1) % 11, 11).float() * 50

    assert perplexity(oracle, ids, seq_len=128) == pytest.approx(1.0, abs=1e-6)
    from graphprune.lm import nll

    total, count = nll(uniform, ids, seq_len=128)
    assert count == 7 * 127 and total == pytest.approx(count * math.log(11))
    two_d = ids[:256].view(2, 128)
    assert nll(uniform, two_d, seq_len=5)[1] == 2 * 127  # 2-D ids are the windows themselves


def test_perplexity_equals_hugging_face_loss_and_restores_training_mode():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 50, (4 * 16 + 5,))
    got = mean_nll(model, ids, seq_len=16, batch_size=3)
    assert model.training
    with torch.no_grad():
        model.eval()
        w = ids[:64].view(4, 16)
        ref = model(input_ids=w, labels=w).loss  # HF shifts the labels itself
    assert got == pytest.approx(float(ref), rel=1e-5)


def test_perplexity_errors():
    uniform = lambda x: torch.zeros(*x.shape, 5)  # noqa: E731
    with pytest.raises(InputError) as e:
        perplexity(uniform, torch.arange(10), seq_len=16)
    assert str(e.value) == ("perplexity: 10 tokens make no window of seq_len=16. "
                            "Give more text or a smaller seq_len.")
    with pytest.raises(InputError, match="must be a 1-D stream or 2-D windows of integer ids"):
        perplexity(uniform, torch.rand(100), seq_len=16)
    with pytest.raises(InputError, match=r"returned \(2, 16\) for token ids of shape \(2, 16\)"):
        perplexity(lambda x: torch.zeros(*x.shape), torch.arange(32), seq_len=16)
    with pytest.raises(ConfigError, match="The 'seq_len' parameter of perplexity must be an int >= 2"):
        perplexity(uniform, torch.arange(32), seq_len=1)


def test_unigram_perplexity():
    train = torch.tensor([0] * 6 + [1] * 2)  # add-one counts over 4 ids: 7, 3, 1, 1 of 12
    test = torch.tensor([0, 1])
    want = math.exp(-(math.log(7 / 12) + math.log(3 / 12)) / 2)
    assert unigram_perplexity(train, test, 4) == pytest.approx(want)


# ---- calibration ----------------------------------------------------------------------------

def test_text_calibration_samples_seeded_windows_of_the_file(tmp_path):
    text = "".join(f"line {i} of the calibration text.\n" for i in range(200))
    path = tmp_path / "calib.txt"
    path.write_text(text)
    tok = ByteTokenizer()
    stream = tok.encode(text)
    a = text_calibration(path, tok, n_samples=8, seq_len=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    for row in a.tolist():  # each window is a contiguous run of the text's tokens
        assert any(stream[s:s + 64] == row for s in range(len(stream) - 63))
    assert torch.equal(a, text_calibration(str(path), tok, n_samples=8, seq_len=64, seed=1))
    assert not torch.equal(a, text_calibration(path, tok, n_samples=8, seq_len=64, seed=2))
    assert torch.equal(a, text_calibration(text, tok, n_samples=8, seq_len=64, seed=1))  # the text itself


def test_text_calibration_errors(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("too short")
    with pytest.raises(ConfigError) as e:
        text_calibration(path, ByteTokenizer(), n_samples=4, seq_len=8)
    assert str(e.value) == (f"the text file '{path}' holds 9 tokens; 4 calibration windows of 8 tokens "
                            "need at least 32. Give a longer text, fewer samples or a shorter seq_len.")
    assert isinstance(e.value, GraphPruneError)
    with pytest.raises(ConfigError, match="The calibration text file '.*missing.txt' does not exist."):
        text_calibration(str(tmp_path / "missing.txt"), ByteTokenizer())
    with pytest.raises(ConfigError, match="The 'n_samples' parameter of random_windows must be an int >= 1"):
        random_windows(torch.arange(10), 0, 4)


def test_corpus_calibration_comes_from_the_train_split():
    docs = [Document(f"d{i}", f"document number {i} " * 20) for i in range(60)]
    c = make_corpus(docs, (0.5, 0.25, 0.25))
    tok = ByteTokenizer()
    calib = corpus_calibration(tok, n_samples=16, seq_len=32, seed=0, corpus=c)
    stream = encode_documents(tok, [d.text for d in c.train])
    train_text = "".join(chr(i) if i < 256 else "\0" for i in stream)
    held_out = {d.text[:20].split()[2] for s in ("validation", "test") for d in c.split(s)}
    for row in calib.tolist():
        window = "".join(chr(i) if i < 256 else "\0" for i in row)
        assert window in train_text
        assert not any(f"number {n} " in window for n in held_out)


# ---- toy language and decoder ---------------------------------------------------------------

def test_toy_language_is_a_second_order_chain():
    lang = toy_language(vocab_size=12, branching=3, seed=0)
    assert torch.allclose(lang.table.sum(-1), torch.ones(12, 12))
    assert ((lang.table > 0).sum(-1) == 3).all()
    x = lang.sample(64, 40, seed=0)
    assert (lang.table[x[:, :-2], x[:, 1:-1], x[:, 2:]] > 0).all()  # only allowed transitions
    assert torch.equal(x, lang.sample(64, 40, seed=0))
    opt, bi, uni = lang.optimal_loss(x), lang.bigram_entropy(x), lang.unigram_entropy(x)
    assert opt < bi - 0.5 < uni - 0.5 < math.log(12)
    with pytest.raises(ConfigError, match=r"The 'branching' parameter of toy_language must be an int in \[1"):
        toy_language(vocab_size=4, branching=5)


@pytest.fixture(scope="module")
def toy():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lang = toy_language()
    model = train_toy_decoder(lang)
    assert isinstance(model, transformers.LlamaForCausalLM)
    return lang, model


def test_toy_decoder_learns_beyond_what_one_token_of_context_gives(toy):
    lang, model = toy
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (2, 64, 4, 2)
    test = lang.sample(128, 32, seed=123)
    loss = mean_nll(model, test, seq_len=32)
    assert loss < lang.bigram_entropy(test) - 0.5  # needs the token two back: attention works
    assert loss < lang.unigram_entropy(test) - 1.0
    assert loss > lang.optimal_loss(test) - 1e-3


def test_toy_training_is_deterministic_and_leaves_the_global_random_state_alone():
    pytest.importorskip("transformers")
    state = torch.random.get_rng_state()
    toy_decoder(8)
    assert torch.equal(state, torch.random.get_rng_state())
    a = train_toy_decoder(toy_language(vocab_size=8), steps=3, batch_size=4, seq_len=8)
    b = train_toy_decoder(toy_language(vocab_size=8), steps=3, batch_size=4, seq_len=8)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


# ---- reference model ------------------------------------------------------------------------

def test_lm_spec_validates_itself():
    with pytest.raises(ConfigError) as e:
        LMSpec(num_heads=8, num_kv_heads=3)
    assert str(e.value) == ("LMSpec: num_heads=8 must be a multiple of num_kv_heads=3 "
                            "(each key/value head serves a whole group).")
    with pytest.raises(ConfigError, match="The 'steps' parameter of LMSpec must be an int >= 1. Got 0"):
        LMSpec(steps=0)
    with pytest.raises(ConfigError, match="heads of an even size"):
        LMSpec(hidden_size=24, num_heads=8, num_kv_heads=2)


def test_pretrained_lm_trains_once_caches_atomically_and_reloads_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    docs = [d for d in stdlib_corpus().train[:80]]
    corpus = make_corpus(docs, (0.6, 0.2, 0.2))
    spec = LMSpec(vocab_size=400, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                  intermediate_size=64, seq_len=32, batch_size=4, steps=30, warmup_steps=3, lr=1e-2)
    logs = []
    lm = pretrained_lm(spec, tmp_path, corpus=corpus, log=logs.append)
    assert any("training" in m for m in logs)
    assert os.listdir(tmp_path) == [os.path.basename(lm.path)]  # no staging directory left
    files = set(os.listdir(lm.path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "graphprune_lm.json"} <= files
    cfg = lm.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 400)
    info = json.loads(open(os.path.join(lm.path, "graphprune_lm.json")).read())
    ppl, uni = info["perplexity"], info["unigram_perplexity"]
    assert ppl["test"] < 400 and info["corpus"]["test"]["tokens"] == lm.ids("test").numel() > 1000
    assert info["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert uni > 1 and info["training"]["tokens_seen"] == 30 * 4 * 32
    assert perplexity(lm.model, lm.ids("test"), 32) == pytest.approx(ppl["test"], rel=1e-5)

    logs.clear()
    again = pretrained_lm(spec, tmp_path, corpus=corpus, log=logs.append)
    assert logs == [f"loaded the trained language model from {lm.path}"]
    x = lm.ids("validation")[:64].view(2, 32)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=x).logits, lm.model(input_ids=x).logits)
    plain = transformers.AutoModelForCausalLM.from_pretrained(lm.path)  # a plain HF directory
    tok = transformers.AutoTokenizer.from_pretrained(lm.path)
    assert isinstance(plain, transformers.LlamaForCausalLM)
    assert encode(tok, "The end.") == encode(lm.tokenizer, "The end.")
    other = LMSpec(**{**spec.__dict__, "seed": 1})
    assert other.key(corpus) != spec.key(corpus)
