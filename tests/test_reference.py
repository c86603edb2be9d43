"""The reference model's corpus parsing and its resumable training (a few steps on a tiny text)."""
import pytest
import torch
from safetensors.torch import load_file

from moe_offload.reference import corpus
from moe_offload.reference import train as train_mod

BIBLE_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

1 Samuel 2

  1 And Hannah prayed, and said, My heart rejoiceth in the LORD.
"""


def test_chapters_join_verses_and_wrapped_lines():
    docs = corpus.chapters(BIBLE_OUTPUT)
    assert docs == ["In the beginning God created the heaven and the earth. And the earth was without form, "
                    "and void; and darkness was upon the face of the deep.",
                    "And Hannah prayed, and said, My heart rejoiceth in the LORD."]


def test_every_twentieth_chapter_is_held_out():
    docs = [f"chapter {i}" for i in range(45)]
    train, held = corpus.split(docs)
    assert held == ["chapter 19", "chapter 39"] and len(train) == 43
    assert corpus.prompts(["one two three four five six seven eight nine"]) == ["one two three four five six seven eight"]


def test_missing_bible_program_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(corpus.MoeOffloadError, match="apt-get install"):
        corpus.raw_text()


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    words = "and the lord said unto moses go in unto pharaoh and tell him thus saith the lord".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(300)) for i in range(40)]
    monkeypatch.setattr(corpus, "load_split", lambda: corpus.split(docs))
    kwargs = dict(batch_size=2, progress=False, threads=1)
    train_mod.train(tmp_path / "a", steps=3, **kwargs)  # straight through
    train_mod.train(tmp_path / "b", steps=2, **kwargs)  # stopped after 2 steps ...
    capsys.readouterr()
    report = train_mod.train(tmp_path / "b", steps=3, **kwargs)  # ... and resumed: one more step
    assert "resuming from step 2" in capsys.readouterr().out
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report["steps"] == 3 and len(report["expert_usage"]) == 4
    assert all(abs(sum(row) - 1) < 1e-3 for row in report["expert_usage"])
