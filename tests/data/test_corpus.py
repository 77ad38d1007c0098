import unicodedata

import pytest

from mistura.data import Document, clean_text, load_corpus, load_text_dir, split_documents
from mistura.errors import ConfigError, DataError

PROSE = """CAPÍTULO PRIMEIRO
DO TÍTULO
Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem
da Central um rapaz aqui do bairro, que eu conheço de vista e de chapéu.
Cumprimentou-me, sentou-se ao pé de mim, falou da Lua e dos ministros, e
acabou recitando-me versos.
— Continue, disse eu acordando.
— Já acabei, murmurou ele.
12
Não consultes dicionários. Casmurro não está aqui no sentido que eles
lhe dão, mas no que lhe pôs o vulgo de homem calado e metido consigo.
CAPÍTULO II
"""


def test_wrapped_lines_become_one_paragraph_per_line():
    assert clean_text(PROSE).split("\n") == [
        "CAPÍTULO PRIMEIRO",
        "DO TÍTULO",
        "Uma noite destas, vindo da cidade para o Engenho Novo, encontrei no trem da Central um rapaz aqui "
        "do bairro, que eu conheço de vista e de chapéu. Cumprimentou-me, sentou-se ao pé de mim, falou da "
        "Lua e dos ministros, e acabou recitando-me versos.",
        "— Continue, disse eu acordando.",
        "— Já acabei, murmurou ele.",
        "Não consultes dicionários. Casmurro não está aqui no sentido que eles lhe dão, mas no que lhe pôs "
        "o vulgo de homem calado e metido consigo.",
        "CAPÍTULO II",
    ]


ROOM_LEFT = (
    "A casa em que moro é própria; fi-la construir de propósito, e vá lá.\n"  # "Um" fits after "lá."
    "Um dia, há bastantes anos, lembrou-me reproduzir no Engenho Novo a casa\n"
    "em que me criei na antiga Rua de Mata-cavalos, dando-lhe o mesmo aspecto.\n"
)


def test_a_sentence_ending_with_room_left_on_the_line_ends_the_paragraph():
    assert clean_text(ROOM_LEFT).split("\n") == [
        "A casa em que moro é própria; fi-la construir de propósito, e vá lá.",
        "Um dia, há bastantes anos, lembrou-me reproduzir no Engenho Novo a casa em que me criei na antiga "
        "Rua de Mata-cavalos, dando-lhe o mesmo aspecto.",
    ]


def test_blank_line_separated_paragraphs_join_every_single_newline():
    text = ROOM_LEFT + "\nOutro parágrafo começa aqui, e continua por mais uma linha bem inteira\naté acabar.\n"
    assert clean_text(text).split("\n") == [
        "A casa em que moro é própria; fi-la construir de propósito, e vá lá. Um dia, há bastantes anos, "
        "lembrou-me reproduzir no Engenho Novo a casa em que me criei na antiga Rua de Mata-cavalos, "
        "dando-lhe o mesmo aspecto.",
        "Outro parágrafo começa aqui, e continua por mais uma linha bem inteira até acabar.",
    ]


def test_a_short_line_continued_in_lowercase_is_a_wrap_in_prose():
    text = (
        "Madalena olhou para ele com os olhos cheios de lágrimas, e disse-lhe que\n"
        "não sabia\n"
        "o que responder; depois calou-se por muito tempo diante da janela aberta.\n"
    )
    assert clean_text(text) == (
        "Madalena olhou para ele com os olhos cheios de lágrimas, e disse-lhe que não sabia o que responder; "
        "depois calou-se por muito tempo diante da janela aberta."
    )


def test_each_line_of_dialogue_is_a_paragraph():
    text = (
        "— Então não vens ao teatro amanhã, nem mesmo se eu te pedir com jeito?\n"
        "— Não vou, respondeu ela; tenho muito que fazer em casa, e já é tarde\n"
        "para mudar de ideia.\n"
    )
    assert clean_text(text).split("\n") == [
        "— Então não vens ao teatro amanhã, nem mesmo se eu te pedir com jeito?",
        "— Não vou, respondeu ela; tenho muito que fazer em casa, e já é tarde para mudar de ideia.",
    ]


def test_verse_keeps_one_line_per_verse():
    poem = (
        "Ela tinha no rosto uma expressão tão calma\n"
        "Como o sono inocente e primeiro de uma alma\n"
        "onde não penetrou ainda a ideia do mal;\n"
        "1861\n"
    )
    assert clean_text(poem) == poem.rstrip("\n")


@pytest.mark.parametrize(
    ("first", "second", "joined"),
    [
        ("para dar cor local à compa-", "ração, e ficar logo", "comparação,"),
        ("o que se passa nas deliberações faz-", "me crer no ocultismo", "faz-me"),
        ("e tudo isso, meu amigo, far-", "se-á em breve", "far-se-á"),
        ("que alguns quiseram fazer-", "lhe amargar a taça", "fazer-lhe"),
        ("não é exatamente a bem-", "aventurança terrestre", "bem-aventurança"),
        ("ela estava então na lua-de-", "mel, que durou um ano", "lua-de-mel,"),
        ("o navio seguiu de Saint-", "Pierre-Port para o largo", "Saint-Pierre-Port"),
    ],
)
def test_hyphen_at_line_end_is_dropped_only_for_a_split_word(first, second, joined):
    filler = "Era um texto comprido o bastante para encher uma linha da página, "
    text = clean_text(f"{filler}{first}\n{second} e seguia adiante.\n")
    assert joined in text.split()
    assert "\n" not in text


def test_page_numbers_go_but_years_and_roman_numerals_stay():
    text = "I\nPrimeira linha do capítulo.\n— 14 —\n7\n1892\nII\nSegunda linha.\n"
    assert clean_text(text).split("\n") == ["I", "Primeira linha do capítulo.", "1892", "II", "Segunda linha."]


def test_form_feed_is_a_page_break_not_a_paragraph_break():
    line = "uma linha comprida que a página cortou antes de a frase acabar, e"
    assert clean_text(f"{line}\n\f\nque continua na página seguinte.") == f"{line} que continua na página seguinte."


def test_nfc_controls_and_spaces():
    raw = "Cafe\u0301 com a\u00e7u\u0301car\r\nno\u00a0\u00a0copo\t de\x07 vi\u00addro\u200b.\r\n"
    text = clean_text(raw)
    assert text == "Café com açúcar\nno copo de vidro."
    assert unicodedata.is_normalized("NFC", text)


def test_empty_and_blank_text_clean_to_nothing():
    assert clean_text("") == ""
    assert clean_text("\n \n\f\n") == ""


def test_machado_corpus(machado):
    assert len(machado) == 113
    assert [doc.name for doc in machado] == sorted(doc.name for doc in machado)
    assert {doc.genre for doc in machado} == {
        "conto", "critica", "cronica", "miscelanea", "poesia", "romance", "teatro", "traducao",
    }  # fmt: skip
    assert all(doc.name == f"{doc.genre}/{doc.name.split('/')[1]}" and doc.text for doc in machado)
    dom_casmurro = next(doc for doc in machado if doc.name == "romance/domCasmurro")
    assert dom_casmurro.text.startswith("Dom Casmurro\nCAPÍTULO PRIMEIRO\nDO TÍTULO\nUma noite destas, vindo")
    assert all("\n\n" not in doc.text and "  " not in doc.text for doc in machado)


def test_text_dir_walks_subfolders(tmp_path):
    (tmp_path / "romance").mkdir()
    (tmp_path / "romance" / "helena.txt").write_text("Helena\nUm romance.\n", encoding="utf-8")
    (tmp_path / "solto.txt").write_text("Um texto solto.", encoding="utf-8")
    (tmp_path / "vazio.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "notas.md").write_text("não é corpus", encoding="utf-8")
    assert load_text_dir(tmp_path) == [
        Document("romance/helena", "romance", "Helena\nUm romance."),
        Document("solto", "", "Um texto solto."),
    ]
    assert load_corpus(str(tmp_path)) == load_text_dir(tmp_path)
    assert load_corpus(str(tmp_path / "solto.txt")) == [Document("solto", "", "Um texto solto.")]


def test_bad_sources_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text_dir(tmp_path / "nada")
    with pytest.raises(DataError, match="no .txt files"):
        load_text_dir(tmp_path)
    (tmp_path / "vazio.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(DataError, match="has no text"):
        load_corpus(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("coração".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        load_text_dir(tmp_path)
    with pytest.raises(DataError, match="'gutenberg' is not 'machado'"):
        load_corpus("gutenberg")


def _names(documents):
    return [doc.name for doc in documents]


def test_split_keeps_whole_works_apart_and_is_reproducible(machado):
    train, val = split_documents(machado, val_fraction=0.1, seed=1337)
    assert not set(_names(train)) & set(_names(val))
    assert sorted(_names(train) + _names(val)) == _names(machado)
    assert split_documents(machado, 0.1, 1337) == (train, val)
    assert _names(split_documents(machado, 0.1, 7)[1]) != _names(val)
    total = sum(len(doc.text) for doc in machado)
    assert 0.07 < sum(len(doc.text) for doc in val) / total < 0.13
    assert len({doc.genre for doc in val}) >= 3


def test_split_skips_a_work_far_above_the_budget():
    docs = [Document("huge", "", "x" * 1000)] + [Document(f"small{i}", "", "x" * 10) for i in range(20)]
    for seed in range(10):
        train, val = split_documents(docs, val_fraction=0.05, seed=seed)
        assert "huge" in _names(train)
        assert 20 <= sum(len(doc.text) for doc in val) <= 70


def test_split_leaves_both_sides_a_work():
    docs = [Document("a", "", "x" * 100), Document("b", "", "y" * 100)]
    for fraction in (0.01, 0.5, 0.99):
        train, val = split_documents(docs, val_fraction=fraction)
        assert len(train) == len(val) == 1
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(docs[:1])
    with pytest.raises(ConfigError, match="val_fraction"):
        split_documents(docs, val_fraction=1.0)
