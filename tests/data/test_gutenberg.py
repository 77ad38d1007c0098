import json
import urllib.error
from pathlib import Path

import pytest

from mistura.data import download_gutenberg_pt, strip_gutenberg_boilerplate
from mistura.data.gutenberg import GUTENDEX_URL
from mistura.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"

BOOKS = {  # fixture file: (first line of the book, last line of the book)
    "pg_modern.txt": ("CONTOS DO RIO", "mas o pescador não mudava: a mesma canoa, o mesmo chapéu de palha."),
    "pg_2000s.txt": ("VERSOS DO MAR", "Saudade deixam a esperar os pais!"),
    "pg_1990s.txt": ("CARTAS ANTIGAS", "Teu amigo de sempre."),
}
BOILERPLATE = ("Gutenberg", "START OF", "SMALL PRINT", "Produced by", "LICENSE", "Release", "lawyers")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("name", sorted(BOOKS))
def test_strip_keeps_the_book_alone(name, newline):
    raw = (FIXTURES / name).read_text(encoding="utf-8").replace("\n", newline)
    body = strip_gutenberg_boilerplate(raw)
    first, last = BOOKS[name]
    assert body.split("\n")[0] == first
    assert body.split("\n")[-1] == last
    assert not any(word in body for word in BOILERPLATE)
    assert "\r" not in body


def test_text_without_markers_is_kept():
    assert strip_gutenberg_boilerplate("\n\nUm livro sem cabeçalho.\nFim.\n") == "Um livro sem cabeçalho.\nFim."


def _book(book_id, title, formats):
    return {
        "id": book_id,
        "title": title,
        "authors": [{"name": "Exemplo, Autor", "birth_year": 1839, "death_year": 1908}],
        "languages": ["pt"],
        "formats": formats,
    }


def _text_url(book_id):
    return f"https://www.gutenberg.org/ebooks/{book_id}.txt.utf-8"


def _formats(book_id, text_mime="text/plain; charset=utf-8"):
    return {
        text_mime: _text_url(book_id),
        "application/epub+zip": f"https://www.gutenberg.org/ebooks/{book_id}.epub3.images",
    }


class FakeGutenberg:
    """Two Gutendex pages and the fixture books; records every URL asked for."""

    def __init__(self):
        page_2 = "https://gutendex.com/books/?languages=pt&mime_type=text%2Fplain&page=2"
        self.responses = {
            GUTENDEX_URL: {
                "count": 4,
                "next": page_2,
                "results": [
                    _book(90001, "Contos do Rio", _formats(90001)),
                    _book(90009, "Só em Latin-1", {"text/plain; charset=iso-8859-1": "https://x/90009-8.txt"}),
                    _book(90002, "Versos do Mar", _formats(90002)),
                ],
            },
            page_2: {
                "count": 4,
                "next": None,
                "results": [_book(90003, "Cartas Antigas", _formats(90003, "text/plain; charset=us-ascii"))],
            },
        }
        for book_id, name in ((90001, "pg_modern.txt"), (90002, "pg_2000s.txt"), (90003, "pg_1990s.txt")):
            self.responses[_text_url(book_id)] = (FIXTURES / name).read_bytes()
        self.requested = []

    def __call__(self, url):
        self.requested.append(url)
        response = self.responses[url]
        return response if isinstance(response, bytes) else json.dumps(response).encode()


def test_download_cleans_caches_and_records_provenance(tmp_path):
    fetch = FakeGutenberg()
    paths = download_gutenberg_pt(2, tmp_path, fetch=fetch, progress=False)
    assert paths == [tmp_path / "90001.txt", tmp_path / "90002.txt"]
    assert paths[0].read_text(encoding="utf-8").startswith("CONTOS DO RIO\nI\nA CASA DO PESCADOR\nEra uma vez")
    assert "Gutenberg" not in paths[1].read_text(encoding="utf-8")
    records = json.loads((tmp_path / "books.json").read_text(encoding="utf-8"))
    assert [(r["id"], r["title"], r["url"]) for r in records] == [
        (90001, "Contos do Rio", "https://www.gutenberg.org/ebooks/90001.txt.utf-8"),
        (90002, "Versos do Mar", "https://www.gutenberg.org/ebooks/90002.txt.utf-8"),
    ]
    assert records[0]["authors"][0]["name"] == "Exemplo, Autor"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["90001.txt", "90002.txt", "books.json"]
    assert "https://x/90009-8.txt" not in fetch.requested


def test_cached_books_are_not_downloaded_again(tmp_path):
    download_gutenberg_pt(2, tmp_path, fetch=FakeGutenberg(), progress=False)
    fetch = FakeGutenberg()
    paths = download_gutenberg_pt(5, tmp_path, fetch=fetch, progress=False)
    assert [p.name for p in paths] == ["90001.txt", "90002.txt", "90003.txt"]
    book_urls = [url for url in fetch.requested if "gutendex" not in url]
    assert book_urls == ["https://www.gutenberg.org/ebooks/90003.txt.utf-8"]


def test_network_and_api_errors_name_the_url(tmp_path):
    def offline(url):
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(DataError, match="could not download https://gutendex.com/books/"):
        download_gutenberg_pt(1, tmp_path, fetch=offline, progress=False)
    with pytest.raises(DataError, match="unexpected answer from https://gutendex.com"):
        download_gutenberg_pt(1, tmp_path, fetch=lambda url: b"<html>busy</html>", progress=False)
    with pytest.raises(ConfigError, match="n_books"):
        download_gutenberg_pt(0, tmp_path, fetch=FakeGutenberg(), progress=False)
