"""Portuguese books from Project Gutenberg, downloaded once into a cache folder of .txt files.

The Gutendex API (https://gutendex.com) lists Project Gutenberg's books by language,
most downloaded first, one page of results at a time with a link to the next page.
Each book offers several formats; we take its UTF-8 plain text, cut Project
Gutenberg's header and licence off (`strip_gutenberg_boilerplate`), clean it like
any other corpus text, and write `<cache_dir>/<id>.txt`. `books.json` beside them
records each book's id, title, authors and source URL for provenance.

The cache folder is then a corpus like any other: `load_corpus(str(cache_dir))`.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from mistura.atomic import atomic_write
from mistura.data.corpus import clean_text
from mistura.errors import ConfigError, DataError

GUTENDEX_URL = "https://gutendex.com/books/?languages=pt&mime_type=text%2Fplain"
USER_AGENT = "mistura/0.1 (Portuguese language-model toolkit; Python urllib)"
TIMEOUT_S = 60

_START = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG(?:[^*\n]*\n?[^*\n]*\*{3}|.*)$"
    r"|^[ \t]*\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(r"^[ \t]*\**[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG", re.IGNORECASE | re.MULTILINE)
_CREDITS = re.compile(
    r"(?:Produced by|This e-?book was produced by|E-?text prepared by|Transcribed by)"
    r".*?(?:\n[ \t]*\n|\Z)",
    re.IGNORECASE | re.DOTALL,
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The book alone: no Project Gutenberg header, licence, footer or producer credits.

    The body starts after the last start marker ("*** START OF THE PROJECT GUTENBERG
    EBOOK ... ***", or the 1990s "*END*THE SMALL PRINT! ...") and stops at the first
    end marker ("*** END OF THIS PROJECT GUTENBERG EBOOK", "End of the Project
    Gutenberg EBook of ...", "End of Project Gutenberg's ..."). Text with no markers
    is returned whole, only stripped of surrounding blank lines.
    """
    text = text.replace("\r\n", "\n")
    end = _END.search(text)
    stop = end.start() if end else len(text)
    begin = max((match.end() for match in _START.finditer(text, 0, stop)), default=0)
    body = text[begin:stop].strip()
    while credits := _CREDITS.match(body):
        body = body[credits.end() :].lstrip()
    return body


def download_gutenberg_pt(
    n_books: int,
    cache_dir: str | Path,
    *,
    fetch: Callable[[str], bytes] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download (or find in `cache_dir`) the `n_books` most popular Portuguese books.

    Returns the paths of their cleaned texts. Books already in the cache are not
    downloaded again. `fetch(url) -> bytes` defaults to an HTTP GET; tests pass a fake.
    """
    if n_books < 1:
        raise ConfigError(f"n_books must be at least 1, got {n_books}")
    fetch = fetch or _http_get
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths, records = [], []
    with tqdm(total=n_books, desc="gutenberg-pt", unit="book", disable=not progress) as bar:
        for book, url in _plain_text_books(fetch):
            path = cache_dir / f"{book['id']}.txt"
            if not path.exists() and not _download_book(fetch, url, path):
                continue
            paths.append(path)
            records.append({"id": book["id"], "title": book.get("title"), "authors": book.get("authors"), "url": url})
            bar.update()
            if len(paths) == n_books:
                break
    if not paths:
        raise DataError(f"no Portuguese plain-text books found at {GUTENDEX_URL}")
    with atomic_write(cache_dir / "books.json") as file:
        file.write(json.dumps(records, indent=2, ensure_ascii=False).encode("utf-8"))
    return paths


def _http_get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read()


def _plain_text_books(fetch: Callable[[str], bytes]) -> Iterator[tuple[dict, str]]:
    """(book, UTF-8 text URL) for every listed book that has one, following the pages."""
    url = GUTENDEX_URL
    while url:
        try:
            page = json.loads(_get(fetch, url))
            books, url = page["results"], page.get("next")
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"unexpected answer from {url}: {error!r}") from error
        for book in books:
            text_url = _utf8_text_url(book.get("formats", {}))
            if text_url:
                yield book, text_url


def _utf8_text_url(formats: dict[str, str]) -> str | None:
    """Gutendex labels formats loosely ("text/plain; charset=us-ascii" often points at a
    ".txt.utf-8" file), so a plain-text URL counts as UTF-8 by its label or its name."""
    for mime, url in formats.items():
        is_utf8 = "utf-8" in mime.lower() or url.endswith(".utf-8")
        if mime.startswith("text/plain") and is_utf8 and not url.endswith(".zip"):
            return url
    return None


def _download_book(fetch: Callable[[str], bytes], url: str, path: Path) -> bool:
    """Write the cleaned book to `path`; False (nothing written) when no text is left."""
    try:
        raw = _get(fetch, url).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{url} is not UTF-8 text: {error}") from error
    text = clean_text(strip_gutenberg_boilerplate(raw))
    if not text:
        return False
    with atomic_write(path) as file:
        file.write(text.encode("utf-8"))
    return True


def _get(fetch: Callable[[str], bytes], url: str) -> bytes:
    try:
        return fetch(url)
    except OSError as error:  # urllib.error.URLError, timeouts and resets are all OSErrors
        raise DataError(f"could not download {url}: {error}") from error
