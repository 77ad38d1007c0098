"""Portuguese corpora as cleaned documents, and their split into train and validation works.

A corpus is a list of `Document`s, one per literary work (or per .txt file). Three
sources are understood: the embedded Machado de Assis corpus (113 works read straight
out of `assets/machado.tar.xz`), a folder of .txt files, or a single .txt file.

The Machado texts were converted from PDF, so `clean_text` undoes what the conversion
left behind:

- PDF line wraps. Each paragraph arrives broken into lines of about the page width
  (68 to 100 characters, depending on the edition; the width is measured per text).
  A line is joined to the next with a space unless `_ends_paragraph` says it ends a
  paragraph, by these rules in order:
    1. a blank line follows, or either line is a heading (no lowercase letter:
       "CAPÍTULO II", "1892", a speaker's name in a play), or the next line is
       dialogue ("— Continue, disse eu"): the paragraph ends;
    2. the line ends in a word and a hyphen: it continues (see below);
    3. in prose, a line not ending a sentence whose next line starts lowercase
       continues, however short: a sentence never starts lowercase;
    4. a line clearly shorter than the page width ends its paragraph (the last line
       of a paragraph, a verse, a date line);
    5. a full line followed by a lowercase line continues;
    6. a full line ending a sentence ends the paragraph only if the next word would
       have fitted on it: otherwise the layout, not the author, broke the line.
  Texts that separate paragraphs with blank lines (Project Gutenberg) skip rule 6,
  since there every single newline is a wrap.
- Words split across a line end. "compa-" + "ração" is rejoined as "comparação", but
  Portuguese also hyphenates clitics and compounds ("disse-me", "far-se-á",
  "bem-aventurança", "lua-de-mel"), and a line may well end after their hyphen. The
  hyphen is dropped only when the next line starts lowercase, its first word is not
  a clitic pronoun, and the part before the hyphen is neither a compound (it has
  another hyphen) nor a known compound prefix ("bem-", "ex-", "vice-"). A true split
  whose second half looks like a clitic ("for-" + "te") keeps its hyphen; in this
  corpus almost every hyphen at a line end is a clitic's.
- Page artefacts. Lines holding only a page number (up to three digits, maybe framed
  by dashes) are dropped; four-digit numbers are kept because here they are years
  heading a chronicle or dating a poem, and roman numerals are kept because they
  number chapters. Form feeds are page breaks, not paragraph breaks; control
  characters, soft hyphens and zero-width characters are removed.

The result is NFC text with one paragraph (or verse, or heading) per line, runs of
spaces collapsed, and no blank lines.
"""

from __future__ import annotations

import random
import re
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mistura.errors import ConfigError, DataError

MACHADO_ARCHIVE = Path(__file__).parent / "assets" / "machado.tar.xz"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\u00ad]")
_SPACES = re.compile(r"[^\S\n]+")
_PAGE_NUMBER = re.compile(r"[-–— ]*\d{1,3}[-–— ]*")
_HYPHEN_AT_END = re.compile(r"([\w-]*\w)-$")
_FIRST_WORD = re.compile(r"\w+")

SENTENCE_END = (".", "!", "?", ":", ";", "…", "»", "”", '"', ")")
DIALOGUE_DASHES = ("—", "–", "-")
CLITICS = frozenset(
    "me te se lhe lhes nos vos o a os as lo la los las no na nas mo ma mos mas to ta tos tas lho lha lhos lhas".split()
)
COMPOUND_PREFIXES = frozenset("bem mal ex vice recém sem além aquém pós pré pró grã grão".split())

FULL_LINE_FRACTION = 0.75  # of the page width: shorter lines end their paragraph
MIN_FULL_LINE = 50  # so verse (lines of 30-45 characters) is never taken for wrapped prose
BLANK_SEPARATED = 0.05  # blank lines per text line above which blank lines mark paragraphs


@dataclass(frozen=True)
class Document:
    """One work: `name` is "genre/file-stem" (or the stem alone), `text` is cleaned."""

    name: str
    genre: str
    text: str


def clean_text(raw: str) -> str:
    """Turn PDF-converted text into NFC paragraphs, one per line (see the module docstring)."""
    text = unicodedata.normalize("NFC", raw)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u00ad\n", "")  # a soft hyphen at a line end is a certain word split
    text = re.sub(r"\n?\f\n?", "\n", text)
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    lines = [line.strip() for line in text.strip().split("\n")]
    lines = [line for line in lines if not _PAGE_NUMBER.fullmatch(line)]
    return _join_wrapped_lines(lines)


def _join_wrapped_lines(lines: list[str]) -> str:
    layout = _Layout.measure(lines)
    pieces = []
    for line, following in zip(lines, [*lines[1:], ""]):
        if not line:
            continue
        if _ends_paragraph(line, following, layout):
            pieces.append(line + "\n")
        elif _HYPHEN_AT_END.search(line):
            pieces.append(line[:-1] if _is_split_word(line, following) else line)
        else:
            pieces.append(line + " ")
    return "".join(pieces).rstrip("\n")


@dataclass(frozen=True)
class _Layout:
    """What a text's line lengths tell about its page."""

    width: int  # a wrapped line's usual length: the 90th percentile of line lengths
    blank_separated: bool  # paragraphs are separated by blank lines, so single newlines are wraps

    @classmethod
    def measure(cls, lines: list[str]) -> _Layout:
        lengths = sorted(len(line) for line in lines if line)
        width = lengths[int(0.9 * (len(lengths) - 1))] if lengths else 0
        blanks = len(lines) - len(lengths)
        return cls(width, blanks > BLANK_SEPARATED * len(lengths))

    @property
    def is_prose(self) -> bool:
        """Verse runs 30-45 characters a line; wrapped prose runs longer."""
        return self.width >= MIN_FULL_LINE

    @property
    def full(self) -> float:
        """Lines shorter than this end their paragraph: the next word would have fitted."""
        return max(FULL_LINE_FRACTION * self.width, MIN_FULL_LINE)


def _ends_paragraph(line: str, following: str, layout: _Layout) -> bool:
    """Rules 1-6 of the module docstring: does a paragraph end between these two lines?"""
    if not following or _is_heading(line) or _is_heading(following):
        return True
    if following.startswith(DIALOGUE_DASHES):
        return True
    if _HYPHEN_AT_END.search(line):
        return False
    if following[0].islower() and layout.is_prose and not line.endswith(SENTENCE_END):
        return False
    if len(line) < layout.full:
        return True
    if following[0].islower() or layout.blank_separated:
        return False
    next_word = following.split(" ", 1)[0]
    return line.endswith(SENTENCE_END) and len(line) + 1 + len(next_word) <= layout.width


def _is_heading(line: str) -> bool:
    """A line with no lowercase letter: "CAPÍTULO II", "DO TÍTULO", "1892", "LUÍS", "* * *"."""
    return not any(char.islower() for char in line)


def _is_split_word(line: str, following: str) -> bool:
    """Whether `line`'s final hyphen splits one word in two rather than joining two words."""
    if not following[:1].islower():
        return False
    head = _HYPHEN_AT_END.search(line).group(1)  # "compa", "lua-de", "bem"
    if "-" in head or head.lower() in COMPOUND_PREFIXES:
        return False
    return _FIRST_WORD.match(following).group().lower() not in CLITICS


def load_machado() -> list[Document]:
    """The embedded Machado de Assis corpus, read from the archive without extracting it."""
    if not MACHADO_ARCHIVE.is_file():
        raise DataError(f"the embedded corpus {MACHADO_ARCHIVE} is missing; reinstall mistura")
    documents = []
    with tarfile.open(MACHADO_ARCHIVE, "r:xz") as archive:
        for member in archive:
            path = PurePosixPath(member.name)
            if not member.isfile() or path.suffix != ".txt":
                continue
            raw = archive.extractfile(member).read().decode("utf-8")
            genre = path.parent.name
            documents.append(Document(f"{genre}/{path.stem}", genre, clean_text(raw)))
    return sorted(documents, key=lambda doc: doc.name)


def load_text_dir(path: str | Path) -> list[Document]:
    """Every .txt file under `path`, recursively; the genre is the file's folder under `path`."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"corpus folder {root} does not exist")
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise DataError(f"corpus folder {root} has no .txt files")
    documents = []
    for file in files:
        relative = file.relative_to(root).with_suffix("")
        genre = relative.parent.as_posix() if relative.parent != Path(".") else ""
        documents.append(Document(relative.as_posix(), genre, clean_text(_read_text(file))))
    return _non_empty(documents, root)


def load_corpus(source: str) -> list[Document]:
    """The embedded corpus for "machado", else a folder of .txt files or a single .txt file."""
    if source == "machado":
        return load_machado()
    path = Path(source)
    if path.is_dir():
        return load_text_dir(path)
    if path.is_file() and path.suffix == ".txt":
        return _non_empty([Document(path.stem, "", clean_text(_read_text(path)))], path)
    raise DataError(f"corpus source '{source}' is not 'machado', a folder, or an existing .txt file")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: {error}") from error


def _non_empty(documents: list[Document], source: Path) -> list[Document]:
    """Drops documents left with no text; an entirely empty corpus is an error."""
    documents = [doc for doc in documents if doc.text]
    if not documents:
        raise DataError(f"corpus {source} has no text")
    return documents


def split_documents(
    docs: list[Document], val_fraction: float = 0.1, seed: int = 1337
) -> tuple[list[Document], list[Document]]:
    """Split whole works into (train, validation), validation holding ~`val_fraction` of the text.

    Works are visited in an order shuffled by `seed` and moved to validation until
    their characters reach the budget, skipping any work more than twice the budget
    still open, so that one huge work cannot become the whole validation set. The
    shuffle mixes genres, so validation is not all poetry or all chronicles. When
    every work is over that limit, the smallest one is the validation set. Both
    sides keep at least one work, and both keep the input order.
    """
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to split into train and validation, got {len(docs)}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    remaining = val_fraction * sum(len(doc.text) for doc in docs)
    chosen = []
    for index in order:
        if remaining <= 0 or len(chosen) == len(docs) - 1:
            break
        size = len(docs[index].text)
        if size <= 2 * remaining:
            chosen.append(index)
            remaining -= size
    if not chosen:
        chosen = [min(order, key=lambda index: len(docs[index].text))]
    val = set(chosen)
    train_docs = [doc for index, doc in enumerate(docs) if index not in val]
    val_docs = [doc for index, doc in enumerate(docs) if index in val]
    return train_docs, val_docs
