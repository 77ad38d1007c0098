"""Shared fixtures: the embedded corpus (loaded once), a small folder corpus cut from it,
and a tokenizer trained on a slice of it."""

from pathlib import Path

import pytest

from mistura.data import Document, load_machado, train_tokenizer

SMALL_CORPUS_WORKS = (
    "conto/papeisAvulsos",
    "critica/iracema",
    "cronica/semana",
    "poesia/falenas",
    "romance/domCasmurro",
    "romance/helena",
    "teatro/quaseMinistros",
    "traducao/oliverTwist",
)


@pytest.fixture(scope="session")
def machado() -> list[Document]:
    return load_machado()


@pytest.fixture(scope="session")
def small_corpus(machado, tmp_path_factory) -> Path:
    """Eight works, 12k characters of each, as a folder of .txt files under genre folders."""
    root = tmp_path_factory.mktemp("small_corpus")
    by_name = {doc.name: doc for doc in machado}
    for name in SMALL_CORPUS_WORKS:
        path = root / f"{name}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(by_name[name].text[:12_000], encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def machado_tokenizer(machado):
    """Vocabulary 2048 trained on three novels (held out: everything else)."""
    novels = [doc.text for doc in machado if doc.name in ("romance/domCasmurro", "romance/esau", "romance/helena")]
    return train_tokenizer(novels, 2048)
